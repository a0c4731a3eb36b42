"""`t2v serve`: the web page and REST API over a persisted job queue (see cli.py, app.py)."""
