"""The REST layer of tubescope: one FastAPI app built from a router per resource (docs/architecture.md, "REST API").

    main.py        create_api(context): the app, its routers, the error handlers and the middleware
    deps.py        ServiceContext and what routes depend on: service, public / reader_key / admin_key, limits
    errors.py      errors as JSON {"error": message}: helpers and exception handlers
    middleware.py  the request-body limit and the request metrics
    health.py      /healthz and /metrics (no key), /v1/status (admin)
    feeds.py       /v1/feeds...            jobs.py     /v1/jobs...
    sources.py     /v1/sources...          search.py   /v1/search          ask.py   /v1/ask

Each router module keeps its request models beside its routes. deploy/app.py serves the app on Ray Serve.
"""
