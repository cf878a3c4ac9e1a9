"""Baseline addon for the SSE benchmark: streams event streams, and does nothing else.

Plain mitmdump buffers a whole response before forwarding it, so it is no baseline for
streaming; this is the least an addon must do to stream, decided on the same header as
aibridge's ``responseheaders`` hook. Load with ``mitmdump -s bench/stream_only.py``.
"""

from mitmproxy import http


class StreamOnly:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is not None and response.headers.get("content-type", "").lower().startswith(
            "text/event-stream"
        ):
            response.stream = True


addons = [StreamOnly()]
