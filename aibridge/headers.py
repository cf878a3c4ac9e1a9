"""A request's headers read once into a plain dict, for the hooks' many look-ups.

mitmproxy's ``Headers`` find a name by lower-casing every field on every look-up; the
request hook looks up about ten names, so one pass into a dict costs less than two look-ups.
"""

from __future__ import annotations

from mitmproxy import http


class HeaderView(dict[str, str]):
    """Lower-case header name → value, decoded as mitmproxy decodes it; a repeated header's
    values joined with ", " (what ``Headers.get`` returns). A snapshot: later changes to
    the flow's headers do not show."""

    __slots__ = ()


def header_view(headers: http.Headers) -> HeaderView:
    view = HeaderView()
    for raw_name, raw_value in headers.fields:
        name = raw_name.decode("utf-8", "surrogateescape").lower()
        value = raw_value.decode("utf-8", "surrogateescape")
        view[name] = f"{view[name]}, {value}" if name in view else value
    return view


def header_value(headers: http.Headers, name: bytes, default: str = "") -> str:
    """``headers.get(name, default)`` in one pass over the raw fields, several times faster
    (mitmproxy converts every field on every look-up); `name` is the lower-case name."""
    found: str | None = None
    for raw_name, raw_value in headers.fields:
        if len(raw_name) == len(name) and raw_name.lower() == name:
            value = raw_value.decode("utf-8", "surrogateescape")
            found = value if found is None else f"{found}, {value}"
    return default if found is None else found
