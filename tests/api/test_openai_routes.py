"""The OpenAI-compatible routes through the official `openai` client, over the footage the footage tests indexed
(this module runs after them in the package's shared app)."""
from __future__ import annotations

import pytest

from pipeline.events import ANSWERS_STREAM

from .http_client import CAM_READER, READER, SOURCE, http

pytestmark = pytest.mark.timeout(180)


def openai_client(served, key: str = READER):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def chat(text: str = "What moves?", url: str = f"tubescope://{SOURCE}?start=0&end=4", **extra) -> dict:
    """A user turn of a video_url part and a question, and the request's other arguments."""
    return {"model": "tubescope", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}], **extra}


def test_openai_client_gets_the_answer_of_ask_plain_and_streamed(served):
    with http(served, READER) as c:
        asked = c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "start": 0, "end": 4,
                                        "max_new_tokens": 8}).json()
    client = openai_client(served)
    assert [m.id for m in client.models.list()] == ["model"]              # the checkpoint folder's name
    # the defaults some clients send are accepted
    out = client.chat.completions.create(**chat(model="model", max_tokens=8, stop=None, presence_penalty=0,
                                                frequency_penalty=0, logprobs=False, n=1))
    assert (out.object, out.model, out.choices[0].finish_reason) == ("chat.completion", "model", "length")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == asked["answer"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (asked["timings"]["prompt_tokens"], 8)
    extra = out.model_extra["tubescope"]
    assert extra["evidence"] == asked["evidence"] and extra["boxes"] == [] and extra["plan"] == asked["plan"]

    chunks = list(client.chat.completions.create(**chat(max_completion_tokens=8, stream=True,
                                                        stream_options={"include_usage": True})))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == asked["answer"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-2].model_extra["tubescope"]["evidence"] == asked["evidence"]

    # sampling as OpenAI and vLLM name it; a system message goes before the question
    sampled = client.chat.completions.create(
        model="tubescope", max_tokens=4, temperature=1.5, seed=3, extra_body={"top_k": 5, "repetition_penalty": 1.1},
        messages=[{"role": "system", "content": "Be brief."}, *chat()["messages"]])
    assert sampled.model_extra["tubescope"]["generation"] == {"temperature": 1.5, "top_p": 1.0, "top_k": 5,
                                                             "repetition_penalty": 1.1, "seed": 3}
    entry = sampled.model_extra["tubescope"]["stream_entry"]
    (_, fields), = served["redis"].client(decode_responses=True).xrange(ANSWERS_STREAM, entry, entry)
    assert fields["question"] == "Be brief.\n\nWhat moves?"


def test_openai_errors_reach_the_clients_exceptions(served):
    import openai

    def refused(error: type, words: str, key: str = READER, **request) -> openai.APIStatusError:
        with pytest.raises(error) as info:
            openai_client(served, key).chat.completions.create(**(request or chat(max_tokens=2)))
        assert words in info.value.body["message"], info.value.body
        return info.value

    assert refused(openai.AuthenticationError, "unknown API key", "not-a-real-key-0000").type == \
        "authentication_error"
    refused(openai.PermissionDeniedError, "may not access source 'clip'", CAM_READER)
    assert refused(openai.NotFoundError, "'gpt-4o' does not exist", **chat(model="gpt-4o")).code == "model_not_found"
    refused(openai.NotFoundError, "nope", **chat(url="tubescope://nope", stream=True))   # before the stream
    assert refused(openai.UnprocessableEntityError, "over the maximum 1024", **chat(max_tokens=1025)).param == \
        "max_tokens"
    refused(openai.UnprocessableEntityError, "same start and end", **chat(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"tubescope://{SOURCE}?start=0"}},
        {"type": "video_url", "video_url": {"url": f"tubescope://{SOURCE}?start=2"}},
        {"type": "text", "text": "What?"}]}]))
    refused(openai.UnprocessableEntityError, "start must be a time", **chat(url=f"tubescope://{SOURCE}?start=soon"))
    assert refused(openai.APIStatusError, "request body over 47920 bytes", **chat(text="x" * 50_000)).status_code == 413
    assert refused(openai.UnprocessableEntityError, "not supported", **chat(stop=["."])).param == "stop"
    refused(openai.UnprocessableEntityError, "no footage", **chat(messages=[{"role": "user", "content": "What?"}]))
    refused(openai.UnprocessableEntityError, "messages", **chat(messages=[{"role": "tool", "content": "x"}]))
    assert openai_client(served).models.retrieve("model").id == "model"
    with pytest.raises(openai.NotFoundError):
        openai_client(served).models.retrieve("gpt-4o")
    with pytest.raises(openai.AuthenticationError):
        openai_client(served, "not-a-real-key-0000").models.list()


def test_openai_image_parts_data_urls_and_own_thumbnails(served):
    """image_url parts: a data: URL and this API's thumbnail URLs (absolute or relative) are answered like /v1/ask
    over the same image bytes; any other URL, a non-image and another source's thumbnail are refused."""
    import base64
    import io

    import openai
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (60, 40), (30, 180, 40)).save(out, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    thumbnail = f"/v1/segments/{SOURCE}%3A2000/thumbnail"

    def parts(*urls: str, text: str = "What is shown?") -> list[dict]:
        return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                             {"type": "text", "text": text}]}]

    client = openai_client(served)
    answer = client.chat.completions.create(model="tubescope", max_tokens=4,
                                            messages=parts(data_url, served["url"] + thumbnail))
    with http(served, READER) as c:
        jpeg = c.get(thumbnail).content
        asked = c.post("/v1/ask", json={"question": "What is shown?", "max_new_tokens": 4, "images": [
            data_url, base64.b64encode(jpeg).decode()]}).json()
    extra = answer.model_extra["tubescope"]
    assert answer.choices[0].message.content == asked["answer"]
    assert answer.usage.prompt_tokens == asked["timings"]["prompt_tokens"]
    assert extra["timings"]["visual_tokens"] == asked["timings"]["visual_tokens"] > 0
    assert extra["plan"]["kind"] == "none" and extra["evidence"] == []
    # a relative thumbnail URL with footage: the image first, then the footage
    both = client.chat.completions.create(model="tubescope", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": thumbnail}},
        {"type": "video_url", "video_url": {"url": f"tubescope://{SOURCE}?start=0&end=2"}},
        {"type": "text", "text": "Is this in the footage?"}]}])
    assert [e["segment_id"] for e in both.model_extra["tubescope"]["evidence"]] == [f"{SOURCE}:0"]

    def refused(error: type, words: str, url: str, key: str = READER) -> None:
        with pytest.raises(error) as info:
            openai_client(served, key).chat.completions.create(model="tubescope", max_tokens=2, messages=parts(url))
        assert words in info.value.body["message"], info.value.body

    for foreign in ("http://example.com/cat.png", "file:///etc/passwd", f"http://elsewhere:1{thumbnail}",
                    thumbnail + "?x=1", "/v1/sources/clip/segments"):
        refused(openai.UnprocessableEntityError, "other URLs are never fetched", foreign)
    refused(openai.UnprocessableEntityError, "not an image", "data:image/png;base64,"
            + base64.b64encode(b"no picture here").decode())
    refused(openai.NotFoundError, "no thumbnail for segment 'clip:2000'", thumbnail, CAM_READER)
    refused(openai.NotFoundError, "no thumbnail for segment 'clip:4000'", f"/v1/segments/{SOURCE}%3A4000/thumbnail")
