"""The Decoder deployment: one Decoder (one model load) per Serve replica, its calls answered as plain dicts and its
streams as async generators that Serve can cancel (docs/architecture.md, "Batched answers")."""
import asyncio
import logging
import threading
import uuid

from ray import serve

from pipeline.index_files import IndexUnavailable
from pipeline.retrieval import RetrievalUnavailable
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class DecoderServer:
    """One Decoder (one model load) per replica. Errors the caller caused come back as {"error", "status"}."""

    def __init__(self, settings: Settings, model_path: str, redis_url: str):
        from deploy.decoder import Decoder
        from pipeline.events import EventSink
        from pipeline.index import SegmentIndex

        replica = _replica_tag()
        self.events = EventSink(redis_url, settings.outbox_dir / "decoder" / replica, maxlen=settings.stream_maxlen,
                                outbox_max=settings.outbox_max_events)
        index = SegmentIndex(settings.index_root, create=False)
        self.decoder = Decoder(settings, model_path, index=index, events=self.events)
        from deploy.summaries import Summarizer
        from pipeline.redis_server import as_client

        self.summarizer = Summarizer(self.decoder, as_client(redis_url), self.events)

    @staticmethod
    def _call(fn, *args, **kwargs) -> dict:
        try:
            return {"result": fn(*args, **kwargs)}
        except LookupError as e:        # unknown source, nothing indexed in the window
            return {"error": str(e).strip("'\""), "status": 404}
        except (IndexUnavailable, RetrievalUnavailable) as e:   # a vanished index root, a retrieval index being
            return {"error": str(e), "status": 503}                # rebuilt: not the caller's fault
        except ValueError as e:
            return {"error": str(e), "status": 422}

    def search(self, req: dict) -> dict:
        return self._call(self.decoder.search_window, req.get("query"), req["sources"], start=req.get("start"),
                          end=req.get("end"), limit=req["limit"], image=req.get("image"))

    def ask(self, req: dict) -> dict:
        return self._call(self.decoder.ask, req["question"], req["sources"], start=req.get("start"),
                          end=req.get("end"), max_new_tokens=req.get("max_new_tokens"),
                          generation=req.get("generation"), images=req.get("images"))

    def score_segments(self, req: dict) -> dict:
        """Standing alerts: scores of new segments for their alerts' queries, on this replica's model (no copy)."""
        return self._call(self.decoder.score_segments, req["segments"], req["queries"])

    async def ask_stream(self, req: dict):
        """Yields {"token": text}... then {"result": answer}, or one {"error", "status"}. ask runs in a thread."""
        async for item in self._streamed("ask", lambda put: self._call(
            self.decoder.ask, req["question"], req["sources"], start=req.get("start"), end=req.get("end"),
            max_new_tokens=req.get("max_new_tokens"), generation=req.get("generation"), images=req.get("images"),
            on_token=lambda t: put({"token": t if isinstance(t, str) else str(t)}))):
            yield item

    async def summarize_stream(self, req: dict):
        """Yields {"line": summary line}... as each is made, then {"result": summary}, or one {"error", "status"}."""
        async for item in self._streamed("summarize", lambda put: self._call(
            self.summarizer.summarize, req["sources"], req.get("start"), req.get("end"),
            granularity=req.get("granularity"), max_new_tokens=req["max_new_tokens"],
            on_line=lambda line: put({"line": line}))):
            yield item

    async def _streamed(self, name: str, work_fn):
        """The items work_fn(put) puts, as it puts them, then what it returns. work_fn runs in a thread; when the
        consumer goes away (Serve cancels this generator: the client closed its stream), the next put raises
        Cancelled there, so a question leaves the batch at its next step instead of decoding for nobody."""
        from deploy.batching import Cancelled       # the replica has the model's imports; the API process does not

        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        done, gone = object(), threading.Event()

        def put(item) -> None:
            if gone.is_set():
                raise Cancelled(f"the {name} stream's client went away")
            loop.call_soon_threadsafe(items.put_nowait, item)

        def work():
            try:
                out = work_fn(put)
            except Cancelled:
                out = None
            except Exception as e:  # noqa: BLE001 - the stream must end with an error event, never hang
                log.exception("streamed %s failed", name)
                out = {"error": f"internal error: {type(e).__name__}: {e}"[:1000], "status": 500}
            if not gone.is_set():
                loop.call_soon_threadsafe(items.put_nowait, out)
                loop.call_soon_threadsafe(items.put_nowait, done)

        threading.Thread(target=work, name=f"{name}-stream", daemon=True).start()
        try:
            while (item := await items.get()) is not done:
                yield item
        finally:                        # finished, cancelled or closed: nothing reads the pieces any more
            gone.set()

    def stats(self) -> dict:
        return self.decoder.stats()

    def __del__(self):
        events = getattr(self, "events", None)
        if events is not None:
            events.close()


def _replica_tag() -> str:
    """A name for this replica's event outbox that a restarted replica reuses (Serve's rank is stable), so events
    parked while Redis was away are still delivered after a restart."""
    try:
        return f"rank-{serve.get_replica_context().rank.rank}"
    except Exception:  # noqa: BLE001 - outside Serve (a plain instance), or no rank in this Serve version
        return f"pid-{uuid.uuid4().hex[:8]}"
