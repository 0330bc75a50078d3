"""The page's icons: small SVG line drawings of our own (24x24 grid, round strokes).

Emoji need an emoji font, which many Linux desktops, servers taking screenshots and older phones lack: there they
render as empty boxes. SVG draws the same everywhere. ``svg(name)`` is inline markup for HTML blocks, ``glyph(name)``
the same drawing inside a chat message, and ``stylesheet`` the CSS behind glyphs and button icons. ``replace_emoji``
swaps the few emoji the chat's own notes use for these drawings when a message is shown; saved texts keep them.
"""

from __future__ import annotations

import re
from urllib.parse import quote

_SHAPES = {
    "plus": '<path d="M12 5v14M5 12h14"/>',
    "trash": '<path d="M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3"/>',
    "pencil": '<path d="M4 20l1-4L16 5l3 3L8 19l-4 1zM14 7l3 3"/>',
    "download": '<path d="M12 4v11M7 10l5 5 5-5M5 20h14"/>',
    "undo": '<path d="M9 14L4 9l5-5"/><path d="M4 9h10a6 6 0 0 1 0 12h-3"/>',
    "sliders": '<path d="M4 6h9M17 6h3M4 12h3M11 12h9M4 18h11M19 18h1"/>'
               '<circle cx="15" cy="6" r="2"/><circle cx="9" cy="12" r="2"/><circle cx="17" cy="18" r="2"/>',
    "image": '<rect x="3" y="5" width="18" height="14" rx="2"/><circle cx="9" cy="10" r="1.5"/>'
             '<path d="M21 16l-5-5-8 8"/>',
    "warning": '<path d="M12 3L2 20h20L12 3z"/><path d="M12 10v4M12 17v.01"/>',
    "info": '<circle cx="12" cy="12" r="9"/><path d="M12 11v6M12 7.5v.01"/>',
    "stop": '<rect x="6" y="6" width="12" height="12" rx="1.5"/>',
    "refresh": '<path d="M20 12a8 8 0 1 1-2.4-5.7"/><path d="M20 4v5h-5"/>',
    "cut": '<path d="M4 12h11"/><path d="M15 8l4 4-4 4"/><path d="M20 5v14"/>',
    "clock": '<circle cx="12" cy="12" r="9"/><path d="M12 7v5l3 2"/>',
    "user": '<circle cx="12" cy="8" r="4"/><path d="M4 21a8 8 0 0 1 16 0"/>',
    "logout": '<path d="M14 4h5v16h-5"/><path d="M10 8l-4 4 4 4M6 12h10"/>',
    "check": '<path d="M5 12l5 5 9-10"/>',
    "close": '<path d="M6 6l12 12M18 6L6 18"/>',
    "history": '<path d="M4 6h16M4 12h16M4 18h10"/>',
}

# The emoji the chat's notes and replies start with (app/chat.py), and the drawing each becomes on screen.
_EMOJI = {"\u26a0": "warning", "\u2139": "info", "\U0001f5bc": "image", "\u23f9": "stop"}
_EMOJI_RE = re.compile("(" + "|".join(_EMOJI) + ")\ufe0f?")


def _markup(name: str, size: int, stroke: str, cls: str) -> str:
    return (f'<svg class="{cls}" width="{size}" height="{size}" viewBox="0 0 24 24" fill="none" stroke="{stroke}" '
            f'stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true">'
            f'{_SHAPES[name]}</svg>')


def svg(name: str, size: int = 16, cls: str = "icon") -> str:
    """Inline SVG markup drawn in the surrounding text colour, for HTML blocks."""
    return _markup(name, size, "currentColor", cls)


def glyph(name: str) -> str:
    """An icon inside a chat message: a span that ``stylesheet()`` draws. (The Chatbot's sanitizer drops an SVG's
    viewBox, so inline SVG would be cut to its corner there.)"""
    return f'<span class="icon i-{name}" aria-hidden="true"></span>'


def _mask(name: str) -> str:
    data = quote('<svg xmlns="http://www.w3.org/2000/svg"' + _markup(name, 24, "black", "icon")[4:], safe="")
    return (f'background-color: currentColor; -webkit-mask: url("data:image/svg+xml,{data}") center / contain '
            f'no-repeat; mask: url("data:image/svg+xml,{data}") center / contain no-repeat;')


def stylesheet(buttons: dict[str, str], size: int = 16) -> str:
    """CSS for ``glyph`` spans, and an icon before the label of each selected button (``{selector: icon}``), in
    the label's colour (a CSS mask over ``currentColor``). Rules, not files: nothing to serve, so nothing an
    upload-folder sweep can delete."""
    rules = [f".i-{name} {{ display: inline-block; width: 1em; height: 1em; vertical-align: -0.15em; {_mask(name)} }}"
             for name in _SHAPES]
    rules += [f'{selector}::before {{ content: ""; display: inline-block; flex: none; width: {size}px; '
              f"height: {size}px; {_mask(name)} }}" for selector, name in buttons.items()]
    return "\n".join(rules)


def replace_emoji(text: str) -> str:
    """``text`` with the chat's own emoji drawn as inline SVG."""
    return _EMOJI_RE.sub(lambda m: glyph(_EMOJI[m.group(1)]), text)


# Emoji and pictographs, for tests that check nothing on the page relies on an emoji font.
EMOJI_RANGES = re.compile("[\u2190-\u21ff\u2300-\u23ff\u2460-\u27bf\u2b00-\u2bff\U0001f000-\U0001faff\ufe0f]")
