"""aibridge: a mitmproxy addon that bridges AI clients to LLM providers and audits them."""

from importlib import metadata

try:
    __version__ = metadata.version("aibridge")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "unknown"
