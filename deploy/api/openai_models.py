"""Request and error models of the OpenAI-compatible routes (deploy/api/openai.py), in the shape the OpenAI API and
vLLM use, so their clients work unchanged. docs/architecture.md, "OpenAI-compatible API"."""
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from deploy.generation import LIMITS


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class MediaURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)      # "detail" and the like: nothing to act on
    url: str


class VideoPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["video_url"]
    video_url: MediaURL = Field(description="tubescope://SOURCE?start=...&end=... (a source id or feed name)")


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: MediaURL = Field(description="data:image/...;base64,... or this API's /v1/segments/{id}/thumbnail "
                                            "(relative, or absolute on this server); no other URL is fetched")


Part = Annotated[Union[TextPart, VideoPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)      # "name" and the like
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,   # JSON true is no number, "2" no int
                              json_schema_extra={"examples": [{
                                  "model": "tubescope",
                                  "messages": [{"role": "user", "content": [
                                      {"type": "video_url", "video_url": {"url": "tubescope://lobby?start=0&end=2"}},
                                      {"type": "text", "text": "Who came in through the door?"}]}],
                                  "max_tokens": 8}]})

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    temperature: float | None = Field(None, ge=LIMITS["temperature"][0], le=LIMITS["temperature"][1])
    top_p: float | None = Field(None, gt=0, le=LIMITS["top_p"][1])
    # vLLM's extra body fields; top_k -1 is vLLM's "off", our 0
    top_k: int | None = Field(None, ge=-1, le=LIMITS["top_k"][1])
    repetition_penalty: float | None = Field(None, ge=LIMITS["repetition_penalty"][0],
                                             le=LIMITS["repetition_penalty"][1])
    seed: int | None = Field(None, ge=LIMITS["seed"][0], le=LIMITS["seed"][1])
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                                     # the caller's own label: not used
    # what some clients send with their defaults: accepted at those defaults, refused otherwise (openai.py)
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """The body of every error of the OpenAI-compatible routes."""
    error: OpenAIError
