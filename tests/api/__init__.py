"""The REST API over real HTTP: one Ray Serve app for the whole package (conftest.py's `served`, package-scoped so
that the route modules share it), real Redis, a real clip indexed by a job.

Order matters and is the file order (pytest runs this package's modules by name, each in its own order):
test_footage_routes.py indexes footage with a job first and then searches and asks over it; test_keys_and_feeds.py
ends with the restart test.
"""
