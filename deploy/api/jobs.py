"""Archive jobs (/v1/jobs): index files already on disk. Every job route needs an admin key.

The job runs in a Ray actor of its own (deploy.job_runner); its record lives in Redis, so any replica can answer for
it, and the service's reconciler resumes a job whose runner is gone."""
from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from deploy.api.deps import ScopedRoute, ServiceContext, admin_key, require_named_source, service
from deploy.api.errors import error_responses
from deploy.auth import Caller

router = APIRouter(route_class=ScopedRoute)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,   # JSON true is no number, "2" no int
                              json_schema_extra={"examples": [{"paths": ["/videos/lobby/*.mp4"],
                                                               "source_id": "lobby"}]})

    paths: list[str] = Field(description="files, folders or globs under file_roots (or allowed pyarrow.fs URIs)")
    source_id: str | None = None


def _job(context: ServiceContext, job_id: str, caller: Caller) -> dict:
    """The job, for a caller that may see its source: another source's job is as absent as a wrong id (404)."""
    from deploy.jobs import get_job

    try:
        job = get_job(context.redis, job_id)
    except KeyError:
        job = None
    if job is None or (caller.sources is not None
                       and (job.get("source_id") is None or not caller.may_see(job["source_id"]))):
        raise HTTPException(404, f"no job with id {job_id!r}")
    return job


@router.post("/v1/jobs", status_code=202, responses=error_responses(408, 413, 422, 503))
def create_job(body: JobCreate, caller: Caller = Depends(admin_key), context: ServiceContext = Depends(service)):
    from deploy.job_runner import submit_job

    require_named_source(caller, body.source_id, "give the job a source_id among them")
    context.index.check_root()                  # 503 now rather than a job that can only fail
    try:
        return submit_job(context.settings.redis_url, context.settings, body.paths, body.source_id,
                          context.job_runners)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None


@router.get("/v1/jobs/{job_id}", responses=error_responses(404, 422, 503))
def get_job(job_id: str, caller: Caller = Depends(admin_key), context: ServiceContext = Depends(service)):
    return _job(context, job_id, caller)


@router.delete("/v1/jobs/{job_id}", status_code=202, responses=error_responses(404, 409, 422, 503))
def cancel_job(job_id: str, caller: Caller = Depends(admin_key), context: ServiceContext = Depends(service)):
    from deploy.jobs import request_cancel

    _job(context, job_id, caller)
    try:
        return request_cancel(context.redis, job_id)
    except KeyError:
        raise HTTPException(404, f"no job with id {job_id!r}") from None
    except ValueError as e:
        raise HTTPException(409, str(e)) from None
