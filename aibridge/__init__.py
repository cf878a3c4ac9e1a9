"""aibridge: a mitmproxy addon that bridges AI clients to LLM providers and audits them."""
