"""API keys, roles and source scopes (deploy.auth), and the path rules of REST jobs (deploy.jobs).

The scope each REST route declares is checked here; the same rules over real HTTP (the 401/403 matrix on every
route) are in tests/api/test_keys_and_feeds.py."""
from __future__ import annotations

import os

import pytest

from deploy.auth import (AuthError, Authorizer, bearer_token, generate_key, require_role, require_sources,
                         visible)
from deploy.jobs import check_job_path, check_job_request
from pipeline.settings import ApiKey, load_settings

ADMIN, READER, CAM = "a" * 20, "r" * 20, "c" * 20


@pytest.fixture
def auth() -> Authorizer:
    return Authorizer([{"key": ADMIN, "role": "admin"}, ApiKey(key=READER, role="reader"),
                       {"key": CAM, "role": "reader", "sources": ["cam1", "lot"]}])


def status_of(fn, *args) -> tuple[int, str]:
    with pytest.raises(AuthError) as info:
        fn(*args)
    return info.value.status, info.value.message


def test_bearer_token_parsing():
    assert bearer_token(f"Bearer {ADMIN}") == ADMIN
    assert bearer_token(f"bearer   {ADMIN}  ") == ADMIN           # scheme is case-insensitive, blanks trimmed
    for header in (None, "", "Bearer", "Bearer   ", f"Basic {ADMIN}", ADMIN):
        assert bearer_token(header) is None


def test_authenticate_known_missing_and_unknown_keys(auth):
    admin = auth.authenticate(f"Bearer {ADMIN}")
    assert (admin.role, admin.sources, admin.is_admin) == ("admin", None, True)
    cam = auth.authenticate(f"Bearer {CAM}")
    assert (cam.role, cam.sources) == ("reader", ("cam1", "lot"))
    assert status_of(auth.authenticate, None) == (401, "missing API key: send the header 'Authorization: Bearer <key>'")
    assert status_of(auth.authenticate, f"Basic {ADMIN}")[0] == 401
    assert status_of(auth.authenticate, "Bearer " + "x" * 20) == (401, "unknown API key")
    assert status_of(auth.authenticate, f"Bearer {ADMIN[:-1]}")[0] == 401      # a prefix is not the key
    assert status_of(auth.authenticate, f"Bearer {ADMIN}a")[0] == 401          # nor is a longer string


def test_roles(auth):
    admin, reader = auth.authenticate(f"Bearer {ADMIN}"), auth.authenticate(f"Bearer {READER}")
    require_role(admin, "admin")
    require_role(admin, "reader")                                   # admin has every role
    require_role(reader, "reader")
    assert status_of(require_role, reader, "admin") == (403, "this operation needs an admin key; this key has "
                                                             "role 'reader'")
    with pytest.raises(ValueError, match="role must be one of"):
        require_role(admin, "root")


def test_source_scopes(auth):
    cam, reader = auth.authenticate(f"Bearer {CAM}"), auth.authenticate(f"Bearer {READER}")
    require_sources(reader, ["anything", "at/all"])                 # unlimited key
    require_sources(cam, ["cam1", "lot", "lot/north"])             # a job's per-file sources under "lot"
    assert status_of(require_sources, cam, ["cam1", "cam2"]) == (403, "this API key may not access source 'cam2'")
    assert status_of(require_sources, cam, ["cam10"])[0] == 403     # a name prefix is not a scope
    assert status_of(require_sources, cam, ["lotx/a"])[0] == 403
    assert visible(cam, ["cam2", "lot/a", "cam1", "x"]) == ["lot/a", "cam1"]
    assert visible(reader, ["cam2", "x"]) == ["cam2", "x"]


def test_no_keys_means_no_service_and_bad_keys_are_refused():
    with pytest.raises(ValueError, match="no API keys configured"):
        Authorizer([])
    with pytest.raises(ValueError, match="key"):
        Authorizer([{"key": "short", "role": "admin"}])
    with pytest.raises(ValueError, match="role"):
        Authorizer([{"key": "k" * 20, "role": "root"}])


def test_generated_keys_are_long_random_and_accepted():
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50 and all(len(k) >= 32 for k in keys)
    key = keys.pop()
    assert Authorizer([{"key": key, "role": "admin"}]).authenticate(f"Bearer {key}").is_admin


def test_keys_are_kept_as_salted_hashes_only():
    """What Serve stores and replicas hold (the pickled settings) has no key in it, only per-key salted hashes."""
    import pickle

    settings = load_settings(api_keys=[{"key": ADMIN, "role": "admin"}, {"key": ADMIN, "role": "reader"}])
    a, b = settings.api_keys
    assert a.key_hash != b.key_hash and a.key_hash.startswith("scrypt$")      # same key, its own salt each
    assert a.matches(ADMIN) and b.matches(ADMIN) and not a.matches(ADMIN[:-1]) and not a.matches(READER)
    for text in (pickle.dumps(settings), repr(settings).encode(), settings.model_dump_json().encode()):
        assert ADMIN.encode() not in text
    assert settings.to_public_dict()["api_keys"] == [{"role": "admin", "sources": None},
                                                     {"role": "reader", "sources": None}]
    # a hash given as it is (the plain key never on this machine) works the same
    given = Authorizer([{"key_hash": a.key_hash, "role": "admin"}])
    assert given.authenticate(f"Bearer {ADMIN}").is_admin
    assert status_of(given.authenticate, f"Bearer {READER}")[0] == 401


@pytest.mark.parametrize("entry,words", [
    ({"key_hash": "plain-text-key-0123456789", "role": "admin"}, "key_hash must have the form"),
    ({"key_hash": "scrypt$1048576$8$1$" + "A" * 22 + "$" + "A" * 43, "role": "admin"}, "out of bounds"),
    ({"key": ADMIN, "key_hash": "x", "role": "admin"}, "not both")])
def test_bad_key_hashes_are_refused(entry, words):
    with pytest.raises(ValueError, match=words) as e:
        load_settings(api_keys=[entry])
    assert ADMIN not in str(e.value)


# ---- which paths a REST job may read ------------------------------------------------------------------------------
@pytest.fixture
def roots(tmp_path):
    allowed = tmp_path / "videos"
    (allowed / "day1").mkdir(parents=True)
    (allowed / "day1" / "a.mp4").write_bytes(b"x")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "b.mp4").write_bytes(b"x")
    os.symlink(tmp_path / "secret", allowed / "escape")
    return tmp_path, load_settings(data_dir=tmp_path / "data", file_roots=[allowed], job_uri_schemes=["s3"])


def test_job_paths_under_roots(roots):
    tmp, settings = roots
    ok = [f"{tmp}/videos/day1/a.mp4", f"{tmp}/videos", f"{tmp}/videos/day1", f"{tmp}/videos/**/*.mp4",
          f"file://{tmp}/videos/day1/a.mp4", f"{tmp}/videos/day1/not-yet.mp4", "s3://bucket/x.mp4"]
    for p in ok:
        assert check_job_path(p, settings) == (p[len("file://"):] if p.startswith("file://") else p)
    bad = [(f"{tmp}/secret/b.mp4", "outside the allowed roots"),
           (f"{tmp}/videos/escape/b.mp4", "outside the allowed roots"),        # a symlink out of the root
           (f"{tmp}/videos/../secret/b.mp4", "'..'"), (f"{tmp}/vid*/a.mp4", "outside the allowed roots"),
           (f"{tmp}/videos/**/../../secret/*.mp4", "'..'"), ("/etc/passwd", "outside the allowed roots"),
           ("videos/a.mp4", "must be absolute"), ("gs://bucket/x.mp4", "URI scheme 'gs'"),
           ("", "non-empty string"), (3, "non-empty string"), (f"{tmp}/videos/a\n.mp4", "control characters")]
    for p, words in bad:
        with pytest.raises(ValueError, match=words):
            check_job_path(p, settings)


def test_job_paths_that_would_hang_or_leave_the_roots_through_proc_or_dev(roots):
    """A FIFO blocks whoever opens it until someone writes, a device never ends, /proc holds the service's own
    secrets (its environment): a REST job naming one is refused before it runs."""
    tmp, settings = roots
    videos = tmp / "videos"
    os.mkfifo(videos / "day1" / "cam.mp4")
    os.symlink("/proc/self/environ", videos / "environ.mp4")
    os.symlink("/proc", videos / "proc")
    os.symlink("/dev/zero", videos / "zero.mp4")
    for p, words in [(f"{videos}/day1/cam.mp4", "is a FIFO, not a video file or a folder"),
                     (f"file://{videos}/day1/cam.mp4", "is a FIFO"),
                     ("/proc/self/environ", "outside the allowed roots"), ("/dev/zero", "outside the allowed roots"),
                     (f"{videos}/environ.mp4", "outside the allowed roots"),
                     (f"{videos}/proc/self/environ", "outside the allowed roots"),
                     (f"{videos}/proc/*/environ", "outside the allowed roots"),
                     (f"{videos}/zero.mp4", "outside the allowed roots")]:
        with pytest.raises(ValueError, match=words):
            check_job_path(p, settings)
    assert check_job_path(f"{videos}/day1", settings) == f"{videos}/day1"        # a folder holding a FIFO: fine


def test_no_roots_means_no_local_files(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match="no file_roots are configured"):
        check_job_path(str(tmp_path / "a.mp4"), settings)
    with pytest.raises(ValueError, match="URI scheme 's3'.*none"):
        check_job_path("s3://b/a.mp4", settings)


def test_job_request_checks(roots):
    tmp, settings = roots
    path = f"{tmp}/videos/day1/a.mp4"
    assert check_job_request([path], " cam1 ", settings) == ([path], "cam1")
    assert check_job_request([path], None, settings) == ([path], None)
    for paths, source_id, words in [([], None, "non-empty list"), (path, None, "non-empty list"),
                                    ([path] * 1001, None, "at most 1000 paths"), ([path], "", "source_id"),
                                    ([path], "a/../b", "source_id"), ([path], "x" * 201, "source_id")]:
        with pytest.raises(ValueError, match=words):
            check_job_request(paths, source_id, settings)


def test_every_route_declares_its_scope():
    """Each REST route names exactly one scope dependency; only health and the console's static files are public,
    metrics need an unlimited admin (or api_metrics_public)."""
    from deploy.api.deps import route_scopes
    from deploy.api.main import ROUTERS

    scopes = {route: found for router in ROUTERS for route, found in route_scopes(router).items()}
    assert scopes == {
        "GET /healthz": ["public"], "GET /metrics": ["metrics"], "GET /v1/status": ["admin"],
        "POST /v1/feeds": ["admin"], "GET /v1/feeds": ["reader"], "GET /v1/feeds/{feed_id}": ["reader"],
        "DELETE /v1/feeds/{feed_id}": ["admin"],
        "POST /v1/jobs": ["admin"], "GET /v1/jobs/{job_id}": ["admin"], "DELETE /v1/jobs/{job_id}": ["admin"],
        "GET /v1/sources": ["reader"], "GET /v1/sources/{source_id:path}/segments": ["reader"],
        "POST /v1/search": ["reader"], "POST /v1/ask": ["reader"], "POST /v1/summarize": ["reader"],
        "GET /v1/segments/{segment_id:path}/thumbnail": ["reader"], "GET /v1/segments/{segment_id:path}": ["reader"],
        "POST /v1/alerts": ["admin"], "GET /v1/alerts": ["reader"], "GET /v1/alerts/hits": ["reader"],
        "GET /v1/alerts/hits/stream": ["reader"], "GET /v1/alerts/{alert_id}": ["reader"],
        "DELETE /v1/alerts/{alert_id}": ["admin"],
        "GET /v1/sources/{source_id:path}/clip": ["reader"],
        "POST /v1/chat/completions": ["reader"], "GET /v1/models": ["reader"], "GET /v1/models/{model}": ["reader"],
        "GET /": ["public"], "GET /console/{name}": ["public"]}
