"""Operations artefacts that ship with the server and that tools check (issue 17): Prometheus
alerting rules (``alerts.yml``) with their promtool unit tests (``alerts_test.yml``) and a
Grafana dashboard (``dashboard.json``). ``README.md`` beside them says how to load them."""
