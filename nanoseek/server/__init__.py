"""The OpenAI-compatible server: `create_app` (app.py), the engine thread (runner.py), request checks (protocol.py)."""
