# The pure-Python twin has exactly the compiled channel's API (tests/test_twin.py runs both through
# the same behaviours), so its type is declared once, in _channel.pyi.
from ._channel import Channel as Channel

__all__ = ["Channel"]
