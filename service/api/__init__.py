"""HTTP: public API, LND webhook, admin API and dashboard (see docs/api.md)."""
