# The pure-Python twin has exactly the compiled channel's API (tests/core/test_twin.py runs both through
# the same behaviours), so its type is declared once, in channel.pyi.
from .channel import Channel as Channel

__all__ = ["Channel"]
