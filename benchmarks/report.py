"""The printed table: one row per figure, value against its bound and the baseline arm, and the goal."""

from __future__ import annotations

GOALS = {
    "a": lambda f: f["value"] is not None and f["value"] >= 0.90 and (f.get("of_bound") or 0) >= 0.98,
    "b": lambda f: f["value"] is not None and f["value"] >= 0.8,
    "c": lambda f: (f.get("reduction_vs_baseline") or 0) >= 400 and f.get("loss_ratio") is not None
    and f["loss_ratio"] <= 1.02,
    "f": lambda f: f["value"] is not None and f["value"] >= 0.95,
}
NAMES = {
    "a": "compute utilization",
    "b": "averaging round efficiency",
    "c": "wire bytes per sample",
    "d": "speed-up to target loss",
    "f": "peer samples/s vs bare loop",
    "g": "join time (s)",
}


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def goal_status(letter: str, figure: dict) -> str:
    check = GOALS.get(letter)
    if check is None:
        return "(no goal)"
    return "met" if check(figure) else "MISSED"


def extra(letter: str, figure: dict) -> str:
    if letter == "a":
        return f"of bound {fmt(figure.get('of_bound'))}, arm {figure.get('arm')}"
    if letter == "b":
        return f"data phase {fmt(figure.get('data_phase'))} (baseline {fmt(figure.get('baseline_data_phase'))})"
    if letter == "c":
        return (f"{fmt(figure.get('reduction_vs_baseline'))}x fewer than baseline, loss ratio "
                f"{fmt(figure.get('loss_ratio'))}")
    if letter == "d":
        return f"efficiency {fmt(figure.get('efficiency'))}, target loss {figure.get('target_loss')}"
    if letter == "f":
        return f"{fmt(figure.get('peer_samples_per_s'))} vs {fmt(figure.get('bare_samples_per_s'))} samples/s"
    if letter == "g":
        return f"parts {figure.get('parts_s')}"
    return ""


def table(results: dict) -> str:
    rows = [("fig", "what", "value", "bound", "baseline", "goal", "detail")]
    for letter in ("a", "b", "c", "d", "f", "g"):
        if letter in results:
            figure = results[letter]
            rows.append((letter, NAMES[letter], fmt(figure.get("value")), fmt(figure.get("bound")),
                         fmt(figure.get("baseline")), goal_status(letter, figure), extra(letter, figure)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    meta = results.get("meta", {})
    lines.append("")
    lines.append(f"mode {meta.get('mode')}, {meta.get('peers')} peers, links {meta.get('link_mbit')} Mbit/s "
                 f"(one stream measured {fmt(meta.get('shaped_stream_mbit'))}), unshaped loopback "
                 f"{fmt(meta.get('unshaped_loopback_mbit'))} Mbit/s, simulated compute "
                 f"{'yes (' + str(meta.get('simulated_step_seconds')) + ' s per micro-batch)' if meta.get('simulated_compute') else 'no'}, "
                 f"commit {meta.get('git_commit')}, {meta.get('wall_seconds')} s, load {fmt(meta.get('load_average_start'))}")
    for note in meta.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
