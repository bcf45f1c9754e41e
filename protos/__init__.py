"""The wire protocol between peer and coordinator (generated code, checked in; see coordinator.proto)."""
