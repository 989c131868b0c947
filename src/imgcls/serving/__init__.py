"""`imgcls serve`: one inference engine behind HTTP.

settings.py: what the server is told (limits, batching, drift); service.py: the engine opened from a run
or an export, the validation reference drift is measured against, and the per-image answer, which is the
row `imgcls predict` writes (inference/files.py `row`); batching.py: the micro-batcher, one inference
thread fed by a bounded queue; drift.py: served scores against validation's; metrics.py: the Prometheus
figures, in a registry of the app's own; app.py: the FastAPI routes; page.py: the HTML page at `/`;
server.py: uvicorn around it all, and `serve`, the command's one call.

Nothing here is imported by the layers below; fastapi, uvicorn, prometheus-client and python-multipart
come with the `serve` extra (`pip install 'imgcls[serve]'`), and `serve` says so when they are missing.
"""
