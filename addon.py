"""Entry point: ``mitmdump -s addon.py`` (or ``mitmweb -s addon.py``) runs AI Bridge."""

from pathlib import Path

from aibridge.bridge import AIBridge
from aibridge.contentview import AIBridgeView
from aibridge.mitmweb import MitmwebDefaults

addons = [
    AIBridge(default_config_dir=Path(__file__).resolve().parent),
    AIBridgeView(),
    MitmwebDefaults(),
]
