"""Message templates: Jinja, sandboxed, with bounds on what one render may print and run.

A template is written by whoever edits the config and rendered over a payload any sender writes, on the event
loop. So a render is bounded: the message it prints (MAX_MESSAGE), the loop iterations and calls it runs
(MAX_STEPS), its time (MAX_RENDER_SECONDS), and the length one filter, method or operator may make from its
arguments before it runs. `compile_template` reports a syntax error with its line; `render` raises past a
bound. Any action may use them: notify does.

A template compiled with an `escape` function escapes every value it prints (what `{{ }}` writes) with it, and
leaves its own text as written: the payload's texts cannot write what the message's format reads as markup
(a chat's mention of everybody, a link that shows other text than where it leads). This is Jinja's
autoescaping, with `escape` in place of HTML's: a value marked `|raw` (or `|safe`), what a macro or a block
prints, is printed as it is.

Escaping a value on its own cannot see what it makes beside the template's text (`<{{ value }}>` with
`!channel` is Slack's `<!channel>`), nor what a filter makes of a block's text. So such a template's message
also knows which of its characters are the template's own (owns): those written in it, in its macros and
blocks too, and those of a `|raw` value. What a filter or method makes anew (`|replace`, `|reverse`, a
slice) is not, whatever it was made of; `~`, `+`, `|join` and `|trim` keep what is. A chat's format can then
break up every mention that is not wholly the template's own (plugins.notify). A change of case over such
text changes what it shows, not its escapes (_recased).
"""

from __future__ import annotations

import bisect
import functools
import inspect
import json
import math
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

# Jinja costs about 2 MB of resident memory and only templates need it: it is imported when the first
# template is compiled, so a gateway with no template (a notify action without one, say) never loads it.
if TYPE_CHECKING:
    from jinja2 import Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from markupsafe import Markup

# The longest message a template may render, and the longest text or list one step may make (`*`, and the
# filters, methods and operators under "what one step may make" below). A template
# runs on the event loop, over a payload any sender writes: `{{ "*" * event.data.rating }}` with a rating
# of 10**9, or a loop printing a large field a hundred thousand times, would take gigabytes and stop the
# gateway (webhooks included) while it runs. Far more than any chat shows: Slack cuts a message at 40,000.
MAX_MESSAGE = 100_000
# The most loop iterations and calls (of macros, methods, a recursive loop's `loop()`) one render may run.
# Bounding what it prints is not enough: `{% for a in event.data.parcels %}{% for b in event.data.parcels %}`
# over a payload of 20,000 parcels runs 400 million iterations, which may print nothing, while no webhook,
# /healthz or /metrics is answered. A message listing a few thousand items, in nested loops, is far below it;
# 100,000 steps take a tenth of a second.
MAX_STEPS = 100_000
# How long one render may run, in the processor time of the event loop's thread (the render runs there start
# to end, and does no I/O): a backstop for what a single step may do over the whole payload, such as
# `{% if p in event.data.flagged %}` in a loop over parcels, a billion comparisons for 20,000 and 50,000 of
# them. Ten times what MAX_STEPS takes. Processor time, not the wall clock's: a host busy with other work
# stretches a render's wall time (a render of 0.15 s took 0.46 s), and would fail a message that renders in
# time, for good, on one host and not another.
MAX_RENDER_SECONDS = 1.0
# The steps between two reads of that time: a read costs ten times a monotonic clock's (a system call).
_STEPS_PER_TIME_CHECK = 16
# The most the steps of one render bounded by MAX_MESSAGE may make and still hold at once. Each may make up to
# MAX_MESSAGE, and a list may keep what each made: `range(n)|map("center", 99999)|list` would hold ten gigabytes
# by MAX_STEPS. What a step made and the render dropped (`{{ event.data.note|lower|length }}` in a loop) is taken
# back (_let_go). Ten messages' worth, far more than a message built of thousands of padded or formatted fields.
MAX_MADE = 10 * MAX_MESSAGE


def isotime(value: float | None) -> str:
    """A Unix timestamp as ISO 8601 UTC (`2026-11-22T10:00:00Z`), for templates: event times are numbers."""
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- what one step may make --------------------------------------------------------------------------------
# Some filters, str methods, operators and globals make in one step a result whose length comes from an
# argument, perhaps a payload's value, rather than from what they are given: `"x"|center(event.data.width)`
# with a width of 10**9 takes a gigabyte before MAX_MESSAGE, MAX_STEPS or MAX_RENDER_SECONDS can stop it. Or
# they repeat a text: `s|replace("", s)` makes len(s)**2 characters. Each is refused before it runs when a
# bound on its result's length, worked out cheaply from its arguments, passes MAX_MESSAGE. They are:
#   filters: center, indent, format, replace, wordwrap (wrapstring), join, tojson (indent), urlize (target,
#     rel), batch (fill_with), slice (fill_with), sum (start=[]);
#   str methods: center, ljust, rjust, zfill, expandtabs, replace, translate, join, format, format_map;
#     and dict.fromkeys;
#   operators: `%` on a text (printf-style widths and precisions), `**`, `*` and `+` on lists (call_binop),
#     `+` and `~` on texts, which double one at each step of `ns.text ~ ns.text` (~: compile_template), and
#     whose new text is also counted against MAX_MADE, as a filter's is (count_joined);
#   what a macro or a block prints, joined into one text (Environment.concat): a macro that prints its
#     argument twice doubles it at each call on its own output; a macro's, a block's called as `self.name()`
#     and a `{% set %}` block's are also counted against MAX_MADE (a set block's: compile_template);
#   the global lipsum().
# A list or dict is measured as it is written out (written_length): one may hold a text many times over.
# What they make is also added up over the render, against MAX_MADE (`+` on lists adds its shorter operand:
# the new list refers to the items of both, and one built up item by item lets the old one go). What a step
# makes as one new object (a text, a list's references) is counted as that object's, and taken back once
# nothing but the count refers to it: MAX_MADE bounds what a render holds at once, not all it ever made
# (count_made, _let_go). What `+` on lists, dict(), batch and slice add stays counted for the whole render.
# A list, dict or namespace may keep what every step of a loop made, so also added up are: the new result of
# every other filter and str method (_count_made_by, Environment.call), the texts a list, tuple or dict written
# in the template holds (hold), what namespace(), cycler() and joiner() are given, what a call passes to a
# macro's varargs and kwargs (Environment.call), what dict() adds, whose result is bounded as a list's is
# (made_dict), and the new text, list or dict that a slice (`text[1:]`: compile_template) or the copy() of a list
# or dict makes (count_copied).
# The other filters and methods make about as much as they are given (escaping, upper-casing or quoting it
# grows it by a small factor at most), which the request body's limit bounds; truncate (its end) and default
# add an argument once. The bounds are right within such a factor (the markup urlize adds is not counted, nor
# escaping): they are there to stop gigabytes, not to count characters.


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _number(value: Any) -> int:
    """A width or count argument; one of another type is left for the call itself to refuse."""
    return value if isinstance(value, int) else 0


def _total(lengths: Iterable[int]) -> int:
    """The sum of `lengths`, taken only until it passes MAX_MESSAGE: a list may hold one large text many times."""
    total = 0
    for length in lengths:
        total += length
        if total > MAX_MESSAGE:
            break
    return total


def written_length(value: Any) -> int:
    """About how long `value` is written out (printed, joined, formatted): a text's length, and for a list,
    tuple or dict its items' with their separators and quotes. Gone through only until it passes MAX_MESSAGE:
    a list can hold one long text many times over at the cost of a reference each (`[text] * 1000`), and it
    costs the whole text each time once written."""
    if isinstance(value, str):
        return len(value)
    total = 0
    pending = [value]
    while pending and total <= MAX_MESSAGE:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, list | tuple | dict):
            total += 2 + 2 * len(item)
            if total <= MAX_MESSAGE:  # else it is too long already, however long its items are
                pending.extend(item.items() if isinstance(item, dict) else item)
        elif isinstance(item, bool):
            total += 5
        elif isinstance(item, int):
            # Its digits, at most one too many (log10(2) < 0.30103), and a sign; str() refuses past 4,300.
            total += item.bit_length() * 30103 // 100_000 + 1 + (item < 0)
        elif isinstance(item, float | type(None)):
            total += 25
        else:  # another object, written as its str(): a view of a dict's values holds the whole dict
            try:
                total += len(str(item))
            except Exception:  # an undefined name, say: writing it fails, with its own error
                total += 4
    return total


def padded_length(value: Any, width: Any = 80, *_: Any) -> int:
    """center, ljust, rjust, zfill."""
    return max(len(_text(value)), _number(width))


def indented_length(value: Any, width: Any = 4, first: Any = False, blank: Any = False) -> int:
    """indent: each line, and the first with `first`, gets `width` spaces (or `width` itself, a text)."""
    text = _text(value)
    indentation = len(width) if isinstance(width, str) else _number(width)
    return len(text) + (text.count("\n") + 2) * indentation


def replaced_length(value: Any, old: Any, new: Any, count: Any = None) -> int:
    """replace: each occurrence of `old` (each position, for an empty one), or the first `count`, becomes `new`."""
    text, old, new = _text(value), _text(old), _text(new)
    times = text.count(old)
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    return len(text) + times * (len(new) - len(old))


def expanded_length(value: Any, tabsize: Any = 8) -> int:
    """expandtabs: each tab becomes up to `tabsize` spaces."""
    text = _text(value)
    return len(text) + text.count("\t") * _number(tabsize)


def translated_length(value: Any, table: Any) -> int:
    """translate: each character becomes what `table` maps it to, which may be a long text."""
    length = 0
    for char, times in Counter(_text(value)).items():
        try:
            mapped = table[ord(char)]
        except LookupError:
            mapped = char
        length += times * (len(mapped) if isinstance(mapped, str) else 1)
    return length


def wrapped_length(
    value: Any,
    width: Any = 79,
    break_long_words: Any = True,
    wrapstring: Any = None,
    break_on_hyphens: Any = True,
) -> int:
    """wordwrap: `wrapstring` between lines. Two lines in a row hold more than `width` characters of the text
    (the second's first word did not fit on the first), so a paragraph has at most 2 * length / width + 1."""
    text = _text(value)
    lines = 2 * len(text) // max(_number(width), 1) + 2 * (text.count("\n") + 1)
    return len(text) + lines * len(_text("\n" if wrapstring is None else wrapstring))


def joined_length(items: Iterable[Any], separator: Any = "") -> int:
    """join: each item's text and a separator."""
    separator_length = len(_text(separator))
    return _total(written_length(item) + separator_length for item in items)


def json_length(value: Any, indent: Any = None) -> int:
    """tojson: each line is indented by `indent` (spaces, or a text) for each level it is nested at."""
    if indent is None:
        return 0
    step = len(indent) if isinstance(indent, str) else _number(indent)
    flat, nested = (len(json.dumps(value, indent=width)) for width in (0, 1))
    return flat + step * (nested - flat)


def urlized_length(
    value: Any,
    trim_url_limit: Any = None,
    nofollow: Any = False,
    target: Any = None,
    rel: Any = None,
    extra_schemes: Any = None,
) -> int:
    """urlize: `target` and `rel` are written into each link, and each link has a dot, a colon or an @."""
    text = _text(value)
    links = sum(1 for word in text.split() if any(mark in word for mark in ".:@"))
    return len(text) + links * sum(len(_text(attribute)) for attribute in (target, rel) if attribute)


def batched_length(value: Any, linecount: Any, fill_with: Any = None) -> int:
    """batch: the last batch is filled up to `linecount` items with `fill_with`."""
    return 0 if fill_with is None else _number(linecount) * (written_length(fill_with) + 2)


def sliced_length(value: Any, slices: Any, fill_with: Any = None) -> int:
    """slice: `slices` lists, empty or not, each filled with `fill_with` at most once."""
    filler = 0 if fill_with is None else written_length(fill_with) + 2
    return _number(slices) * (4 + filler)


def lipsum_length(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> int:
    """lipsum: `n` paragraphs of fewer than `max` words of at most 12 letters."""
    return _number(n) * _number(max) * 15


def power_length(base: Any, exponent: Any) -> int:
    """`**` of two integers: the power's digits."""
    if not (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1):
        return 0
    return int(min(exponent, 10 * MAX_MESSAGE) * math.log10(abs(base))) + 1


# One printf-style conversion after its `%` and `(key)`: flags, width, precision, length modifier, type.
_PRINTF = re.compile(r"[-+ #0]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.?)", re.DOTALL)


def printf_length(template: str, values: Any) -> int:
    """`template % values`: its text, and for each conversion what it prints, its width and its precision,
    written in `template` or taken by `*` from `values`. Read as Python reads it."""
    positional = iter(values if isinstance(values, tuple) else (values,))
    length = len(template)
    start = template.find("%")
    while start != -1 and length <= MAX_MESSAGE:
        key, end = _printf_key(template, start + 1)
        match = _PRINTF.match(template, end)
        assert match is not None  # every part of the pattern may be empty
        width, precision, conversion = match.groups()
        if conversion != "%":
            for number in (width, precision):
                length += abs(_number(next(positional, 0))) if number == "*" else int(number or 0)
            try:
                value = next(positional, "") if key is None else values[key]
            except (LookupError, TypeError):  # no such key, or no mapping: so fails `%`
                break
            length += _printed_length(value, conversion)
        start = template.find("%", match.end())
    return length


def _printf_key(template: str, start: int) -> tuple[str | None, int]:
    """The `(key)` of a conversion if one starts at `start` (its parentheses may nest), and where it ends."""
    if not template.startswith("(", start):
        return None, start
    depth = 0
    for end in range(start, len(template)):
        depth += (template[end] == "(") - (template[end] == ")")
        if depth == 0:
            return template[start + 1 : end], end + 1
    raise ValueError("incomplete format key")


def _printed_length(value: Any, conversion: str) -> int:
    """How long a conversion prints `value`, before its width and precision."""
    if isinstance(value, int):
        return value.bit_length() // 3 + 3  # digits in any base, a sign and a 0x
    if isinstance(value, float):
        return 330  # 1e308 written out, with a sign and a point
    return len({"r": repr, "a": ascii}.get(conversion, str)(value))


def spec_length(spec: str) -> int:
    """How far a str.format spec may pad or extend a field: its numbers (width, precision) added up."""
    return sum(int(number) for number in re.findall(r"\d+", spec))


def summed_length(values: Iterable[Any], start: Any = 0) -> int:
    """sum of lists (`start=[]`): all their items."""
    if not isinstance(start, list | tuple):
        return 0
    lists = (value for value in values if isinstance(value, list | tuple))
    return written_length(start) + _total(written_length(value) for value in lists)


def dict_length(keys: Iterable[Any], value: Any = None) -> int:
    """dict.fromkeys: each key, with `value` written after it."""
    each = written_length(value) + 4
    return _total(written_length(key) + each for key in keys)


def _str_joined_length(separator: str, items: Iterable[Any]) -> int:
    return joined_length(items, separator)


# The str methods among them, with their signatures; format and format_map are bounded by their formatter.
_STR_LENGTHS: dict[str, Callable[..., int]] = {
    "center": padded_length,
    "ljust": padded_length,
    "rjust": padded_length,
    "zfill": padded_length,
    "expandtabs": expanded_length,
    "replace": replaced_length,
    "translate": translated_length,
    "join": _str_joined_length,
}
_STR_METHODS = {
    name: (length, inspect.signature(getattr(str, name))) for name, length in _STR_LENGTHS.items()
}
_FROMKEYS = inspect.signature(dict.fromkeys)


def check_length(length: int, what: str, kind: str = "str") -> None:
    """Refuses a step whose result would be longer than MAX_MESSAGE, or would take what the render's steps
    made past MAX_MADE, before it runs."""
    refuse_past_limit(length, what, kind)
    count_made(length, what)


def refuse_past_limit(length: int, what: str, kind: str = "str") -> None:
    if length > MAX_MESSAGE:
        from jinja2.exceptions import SecurityError

        raise SecurityError(f"{what} would make a {kind} longer than {MAX_MESSAGE}")


# count_made's `made` when a length is the object's of no one result: counted for the whole render.
_UNTRACKED = object()
# The shortest length kept with its object, to be taken back: one kept costs some 150 bytes of its own until it
# is let go, so that a million one-character texts would take more to keep than they count for. Shorter ones
# are counted for the whole render, 62,500 of them at most before they reach MAX_MADE.
_SMALLEST_TRACKED = 16


def count_made(length: int, what: str, made: Any = _UNTRACKED) -> None:
    """Adds `length` to what the render under way made, refused past MAX_MADE. With `made`, the object whose own
    length it is (a text's characters, a list's references), it is taken back once nothing refers to `made`
    any more, and it is not added again for an object it was added for already."""
    budget = _budget.get()
    if budget is None:  # not rendered by render(): nothing to bound
        return
    if made is not _UNTRACKED and length >= _SMALLEST_TRACKED:
        if id(made) in budget.tracked or id(made) in budget.kept:  # the same object, counted once
            return
        budget.tracked[id(made)] = (made, length)
    budget.made += length
    if budget.made > MAX_MADE:
        _let_go(budget)
        if budget.made > MAX_MADE:
            from jinja2.exceptions import SecurityError

            raise SecurityError(f"{what} would take what this render made past {MAX_MADE} characters")


def track(made: Any, length: int) -> None:
    """Marks `length`, counted by check_length before the step ran, as the own length of `made`, its result:
    taken back once nothing refers to it (and at once if it was counted already: a step may return what it
    was given)."""
    budget = _budget.get()
    if budget is None or length < _SMALLEST_TRACKED:
        return
    if id(made) in budget.tracked or id(made) in budget.kept:
        budget.made -= length
    else:
        budget.tracked[id(made)] = (made, length)


def _reference_counts(tracked: dict[int, tuple[Any, int]]) -> dict[int, int]:
    return {key: sys.getrefcount(entry[0]) for key, entry in tracked.items()}


# What _reference_counts finds for an object that only the budget refers to: measured, not assumed, as the
# interpreter's own references differ between versions.
_UNREFERENCED = _reference_counts({0: (object(), 0)})[0]


def _let_go(budget: _Budget) -> None:
    """Takes back what was counted for the objects the budget alone refers to: the render dropped them, and
    they are freed as the budget lets them go. A text a filter made in one iteration of a loop and did not
    keep is not counted in the next. An object referred to from anywhere else (a list, a namespace, a
    variable, the expression being evaluated; a reference cycle) stays counted.
    The objects counted since the last time are looked at first, and those still referred to moved to `kept`,
    looked at only when that is not enough: a render near its bound that keeps many small objects and drops
    a large one at each step does not go through all it keeps at each step."""
    for tracked in (budget.tracked, budget.kept):
        dropped = [key for key, count in _reference_counts(tracked).items() if count <= _UNREFERENCED]
        for key in dropped:
            budget.made -= tracked.pop(key)[1]
        if tracked is budget.tracked:
            budget.kept.update(tracked)
            tracked.clear()
        if budget.made <= MAX_MADE:
            return


def count_held(holder: Any, values: Iterable[Any], what: str) -> None:
    """What a list, tuple or dict written in a template, a namespace(), cycler() or joiner() holds that may be
    new, each counted as its own object: the holder's references (with no holder, none); each text it holds
    (the result of a short `~`, say, counted nowhere else); each list, tuple or dict it holds, by its references (its
    items were counted where they were made). An object counted already, as a large text of the payload held
    at each step of a loop, is not counted again."""
    values = list(values)
    if holder is not None:
        count_made(2 + 2 * len(values), what, holder)
    for value in values:
        if isinstance(value, str):
            count_made(len(value), what, value)
        elif isinstance(value, list | tuple | dict):
            count_made(2 + 2 * len(value), what, value)


def count_joined(made: str, what: str) -> None:
    """The text `+`, `~`, a macro or a block made, counted as its own object: a recursive macro that passes
    `text ~ "!"` (or `bang(text)`, `self.line()`) on holds a new one at each level until the deepest returns.
    One built up item by item (`ns.text ~ item`) lets the one before go, which is taken back. One shorter than
    _SMALLEST_TRACKED is not counted: it would stay counted for the whole render, and `"parcel " ~ i` in a loop
    of 100,000 would add up to the bound while holding nothing; what may keep many of them counts them itself
    (a list or dict written in the template, namespace())."""
    if len(made) >= _SMALLEST_TRACKED:
        count_made(len(made), what, made)


def count_copied(made: Any, what: str) -> None:
    """A new text, list or dict made of part or all of one the render had (a slice, a list's copy), counted as
    its own object: a recursive macro that passes `text[1:]` or `items.copy()` on holds a new one at each level.
    No longer than what it was made of, it needs no check before it is made. One shorter than _SMALLEST_TRACKED
    is not counted, as count_joined says."""
    length = made_length(made)
    if length >= _SMALLEST_TRACKED:
        count_made(length, what, made)


def count_result(made: Any, what: str) -> None:
    """A new result of a str method: a text, or a list or tuple of texts (split, partition), each counted as its
    own object; anything else by its written length, for the whole render."""
    if isinstance(made, str):
        count_made(len(made), what, made)
    elif isinstance(made, list | tuple):
        count_made(2 + 2 * len(made), what, made)
        for item in made:
            if isinstance(item, str):
                count_made(len(item), what, item)
            else:
                count_made(written_length(item), what)
    else:
        count_made(written_length(made), what)


def known_length(value: Any) -> int:
    """written_length(value), taken from the render's budget when `value` is the last list or dict it made."""
    budget = _budget.get()
    if budget is not None and budget.last is not None and budget.last[0] is value:
        return budget.last[1]
    return written_length(value)


def remember_length(value: Any, length: int) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.last = (value, length)


def made_dict(made: dict[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[Any, Any]:
    """The `dict(...)` global's result, bounded as a list is: no longer than MAX_MESSAGE written out, and its new
    entries (the keyword arguments; the mapping it copies refers to what it held) counted against MAX_MADE.
    Unbounded, `{% set ns.d = dict(ns.d, **{i|string: text|upper}) %}` in a loop kept a new copy of the
    text at each step: 630 MB of a 900 KB payload within the second a render may run."""
    added = {key: value for key, value in kwargs.items() if key not in _JINJA_KWARGS}
    added_length = written_length(added) - 2  # its entries, without its braces
    copied = args[0] if args else {}
    if isinstance(copied, dict) and len(made) == len(copied) + len(added):  # no key replaced: lengths add up
        length = known_length(copied) + added_length
    else:
        length = written_length(made)
    refuse_past_limit(length, "dict()", "dict")
    count_made(added_length, "dict()")
    remember_length(made, length)
    return made


def made_length(value: Any) -> int:
    """What a filter made that is not bounded by _bound_growth: a text's length, and for a list, tuple or dict
    its own references (the texts it refers to were made, and counted, elsewhere: it reorders or selects)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple | dict):
        return 2 + 2 * len(value)
    return 0


def _count_made_by(function: Callable[..., Any], what: str) -> Callable[..., Any]:
    """`function` (a filter), whose result, when new, is counted against MAX_MADE after it runs. Each makes
    about as much as it is given, a bounded step, but a dict, list or namespace may keep what each step made:
    `{% set ns.l = [ns.l, event.data.note|upper] %}` in a loop kept a new copy of the note at each step."""

    @functools.wraps(function)
    def counted(*args: Any, **kwargs: Any) -> Any:
        made = function(*args, **kwargs)
        if not any(made is given for given in args):  # `|string` of a text, `|default` of a defined value
            count_made(made_length(made), what, made)
        return made

    return counted


def _length_of(
    length: Callable[..., int],
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    skip: int = 0,
) -> int:
    """`length` of a call's arguments but the first `skip`. Arguments that do not fit the function's `signature`
    are refused with a TypeError that says why, rather than one that names `length`."""
    try:
        return length(*args[skip:], **kwargs)
    except TypeError:
        signature.bind(*args, **kwargs)
        raise


def _bounded(
    function: Callable[..., Any], length: Callable[..., int], what: str, kind: str, consumes: bool
) -> Callable[..., Any]:
    """`function` (a filter or global), refused before it runs when `length` of its arguments passes MAX_MESSAGE.
    With `consumes`, the value it goes through is made a list first, for `length` to go through it too."""
    signature = inspect.signature(function)
    skip = 1 if hasattr(function, "jinja_pass_arg") else 0  # the context or environment Jinja passes first

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if consumes and len(args) > skip:
            args = (*args[:skip], list(args[skip]), *args[skip + 1 :])
        counted = _length_of(length, signature, args, kwargs, skip)
        check_length(counted, what, kind)
        made = function(*args, **kwargs)
        if isinstance(made, str):  # batch and slice make lists of new lists: counted for the whole render
            track(made, counted)
        return made

    return bounded


def _bound_growth(env: ImmutableSandboxedEnvironment) -> None:
    """Wraps the filters and globals whose result's length comes from an argument, listed above."""
    from jinja2.filters import make_attrgetter
    from jinja2.utils import generate_lorem_ipsum

    def attributes(items: Iterable[Any], attribute: Any) -> Iterable[Any]:
        return items if attribute is None else map(make_attrgetter(env, attribute), items)

    def join(items: Iterable[Any], d: Any = "", attribute: Any = None) -> int:
        return joined_length(attributes(items, attribute), d)

    def sum_(items: Iterable[Any], attribute: Any = None, start: Any = 0) -> int:
        return summed_length(attributes(items, attribute), start)

    def printf(value: Any, *args: Any, **kwargs: Any) -> int:
        return printf_length(_text(value), kwargs or args)

    filters: list[tuple[str, Callable[..., int], str]] = [
        ("center", padded_length, "str"),
        ("indent", indented_length, "str"),
        ("format", printf, "str"),
        ("replace", replaced_length, "str"),
        ("wordwrap", wrapped_length, "str"),
        ("join", join, "str"),
        ("tojson", json_length, "str"),
        ("urlize", urlized_length, "str"),
        ("batch", batched_length, "list"),
        ("slice", sliced_length, "list"),
        ("sum", sum_, "list"),
    ]
    for name, length, kind in filters:
        env.filters[name] = _bounded(env.filters[name], length, f"|{name}", kind, name in ("join", "sum"))
    bounded = {name for name, _, _ in filters}
    for name in set(env.filters) - bounded - _SELECTING_FILTERS:
        env.filters[name] = _count_made_by(env.filters[name], f"|{name}")
    env.globals["lipsum"] = _bounded(generate_lorem_ipsum, lipsum_length, "lipsum()", "str", False)


@dataclass(slots=True)
class _Budget:
    """What the render under way may still do."""

    steps: int
    deadline: float  # time.thread_time()
    made: int = 0  # by the steps check_length let run, less what _let_go took back
    # The objects whose own length `made` holds, by id, with it: let go, and taken back, when the render dropped
    # them (_let_go). Those counted since _let_go last ran, and those it found referred to.
    tracked: dict[int, tuple[Any, int]] = field(default_factory=dict)
    kept: dict[int, tuple[Any, int]] = field(default_factory=dict)
    # The last list or dict `+` or dict() made, and its written length: one built up item by item is not gone
    # through again at each step (a list of 5,000 items would take seconds), only what each step adds.
    last: tuple[Any, int] | None = None


# Filters that return one of the values they are given, or an item of it, and make nothing new: not counted.
_SELECTING_FILTERS = frozenset({"attr", "d", "default", "first", "last", "max", "min", "random"})

# The globals that keep what they are given, by the name of their class.
_HOLDERS = {"Namespace": "namespace", "Cycler": "cycler", "Joiner": "joiner"}

# What Jinja adds to the keyword arguments of a call in a loop or a block, for itself: not the callee's.
_JINJA_KWARGS = frozenset({"_loop_vars", "_block_vars"})

# The render under way on this thread (templates run on the event loop, one at a time, start to end).
_budget: ContextVar[_Budget | None] = ContextVar("template_render_budget", default=None)


def _check_time() -> None:
    """Raises past MAX_RENDER_SECONDS, within a render."""
    from jinja2.exceptions import SecurityError

    budget = _budget.get()
    if budget is not None and time.thread_time() > budget.deadline:
        raise SecurityError(f"rendering took more than {MAX_RENDER_SECONDS:g} s of processor time")


# How a template escapes what it prints: a function of a text (see compile_template), or None for nothing.
Escape = Callable[[str], str] | None


class Spans:
    """Where a text is the template's own, kept as the text was put together: its `parts`, each a stretch of it
    that is all own, or that is a stretch of another text's own as it was there. The (start, end) pairs are
    worked out when asked for, once (pairs). Working them out at each join or trim made a text built up in a
    loop (`{% set ns.text = ns.text ~ line %}`, `(ns.text ~ line)|trim`, `line ~ ns.text`) cost the square of
    its pieces: 2,000 lines took past MAX_RENDER_SECONDS, where a tenth of a second had been enough."""

    __slots__ = ("_pairs", "length", "parts")

    def __init__(self, length: int, parts: tuple[_Part, ...]) -> None:
        self.length, self.parts = length, parts
        self._pairs: list[tuple[int, int]] | None = None

    def __bool__(self) -> bool:
        return bool(self.parts)

    def pairs(self) -> list[tuple[int, int]]:
        """Where the text is own: (start, end) pairs, in order, apart from one another."""
        if self._pairs is None:
            self._pairs = _worked_out(self)
        return self._pairs


# A stretch of a text: (where it starts in the text, where it starts and ends in the other text's own it is a
# stretch of, that other's Spans or None for a stretch all own).
_Part = tuple[int, int, int, "Spans | None"]

NO_SPANS = Spans(0, ())
# The names the compiled code of a template that escapes prints its own text from (compile_template).
OWN_TEXT = "own_text_"


class _Owned(str):
    """A text, not escaped, that knows where it is the template's own: what a macro or a block prints before
    Jinja marks it as escaped, and a rendered message. Its methods make plain texts, none of it own."""

    _own: Spans = NO_SPANS


def owns(text: str, start: int, end: int) -> bool:
    """Whether `text[start:end]`, of a message a template compiled with an `escape` rendered, is all the template's
    own text (or a `|raw` value's). Of any other text, nothing is."""
    own = _own_of(text).pairs()
    index = bisect.bisect_right(own, (start, math.inf)) - 1
    return index >= 0 and own[index][1] >= end


def _own_of(text: Any) -> Spans:
    # Only a text: a payload's value or an undefined name has no `_own`, and the latter fails on being asked.
    return getattr(text, "_own", NO_SPANS) if isinstance(text, str) else NO_SPANS


def _all_own(length: int) -> Spans:
    return Spans(length, ((0, 0, length, None),)) if length else NO_SPANS


def _joined_own(pieces: Iterable[str], separator: str = "") -> Spans:
    """Where `separator.join(pieces)` is own: `<!{% if a %}here{% endif %}>` is three pieces of the template's,
    one mention (pairs makes one of stretches that touch). A piece whose own is one stretch is taken in as that
    stretch, not as a stretch of the piece: a text made of a text made of a text is not gone through link by link."""
    parts: list[_Part] = []
    offset = 0
    for index, piece in enumerate(pieces):
        for part in (separator, piece) if index and separator else (piece,):
            if type(part) is not str:  # a plain text is no one's own
                own = _own_of(part)
                if len(own.parts) == 1:
                    start, first, last, other = own.parts[0]
                    parts.append((offset + start, first, last, other))
                elif own:
                    parts.append((offset, 0, own.length, own))
            offset += len(part)
    return Spans(offset, tuple(parts)) if parts else NO_SPANS


def _cut_own(own: Spans, start: int, end: int) -> Spans:
    """Where `text[start:end]` is own, for a text owned at `own`."""
    parts: list[_Part] = []
    for at, first, last, other in own.parts:
        cut_start, cut_end = max(at, start), min(at + last - first, end)
        if cut_start < cut_end:
            parts.append((cut_start - start, first + cut_start - at, first + cut_end - at, other))
    return Spans(end - start, tuple(parts)) if parts else NO_SPANS


def _worked_out(own: Spans) -> list[tuple[int, int]]:
    """The (start, end) pairs of `own`, in order, those that touch made one. A stretch another text's own is
    taken from may be taken many times (`ns.text ~ ns.text`): gone through each time, as long as the render may
    run (within render, which works out its message's)."""
    pairs: list[tuple[int, int]] = []
    # Stretches still to go through, the next last: whose, how far its positions are from the whole text's, and
    # where it starts and ends in it.
    pending: list[tuple[Spans | None, int, int, int]] = [(own, 0, 0, own.length)]
    gone_through = 0
    while pending:
        other, shift, first, last = pending.pop()
        if other is None:  # all own
            start, end = first + shift, last + shift
            if pairs and pairs[-1][1] >= start:
                pairs[-1] = (pairs[-1][0], end)
            else:
                pairs.append((start, end))
            continue
        found = []
        for at, part_first, part_last, part_other in other.parts:
            cut_start, cut_end = max(at, first), min(at + part_last - part_first, last)
            if cut_start < cut_end:
                moved = part_first - at
                found.append((part_other, shift - moved, cut_start + moved, cut_end + moved))
        pending.extend(reversed(found))
        gone_through += len(other.parts)
        if gone_through > 10_000:
            gone_through = 0
            _check_time()
    return pairs


def _with_own(text: str, own: Spans) -> str:
    if not own:
        return text
    owned = _Owned(text)
    owned._own = own
    return owned


def _stripped_bounds(text: str, chars: str | None, left: bool, right: bool) -> tuple[int, int]:
    start = len(text) - len(str.lstrip(text, chars)) if left else 0
    end = len(str.rstrip(text, chars)) if right else len(text)
    return start, max(start, end)


@functools.cache
def _cased_escapes(escape: Callable[[str], str]) -> tuple[re.Pattern[str], dict[str, str]] | None:
    """The sequences `escape` writes for a character that a change of case would change (Slack's `&amp;`,
    `&lt;` and `&gt;`), found once, with the character each shows; None for an escape that writes none."""
    shown = {escape(char): char for char in string.punctuation}
    cased = {sequence: char for sequence, char in shown.items() if sequence.swapcase() != sequence}
    if not cased:
        return None
    alternatives = sorted(cased, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alternatives))), cased


def _recased(text: str, change: Callable[[str], str], escape: Callable[[str], str]) -> str:
    """`change` (upper, title, ...) of a text escaped with `escape`, applied to what the text shows and not to
    its escapes: upper-cased, Slack's `&amp;` was `&AMP;`, which Slack shows as it is. Each stretch between two
    escapes is changed as it would be after the character the escape before it shows (title and capitalize
    look at what comes before a letter)."""
    text = str.__str__(text)  # plain: a piece of escaped text would escape what it is added to
    found = _cased_escapes(escape)
    if found is None:
        return change(text)
    pattern, shown = found
    pieces: list[str] = []
    done, before = 0, ""
    for match in pattern.finditer(text):
        pieces += [_changed_after(text[done : match.start()], change, before), match[0]]
        done, before = match.end(), shown[match[0]]
    pieces.append(_changed_after(text[done:], change, before))
    return "".join(pieces)


def _changed_after(piece: str, change: Callable[[str], str], before: str) -> str:
    if not before:
        return change(piece)
    return change(before + piece)[len(change(before)) :]


@functools.cache
def _escaped_text(escape: Callable[[str], str]) -> type[Markup]:
    """The Markup class of texts escaped with `escape`: what it holds is printed as it is, and what it is
    joined with, formatted with or added to is escaped with `escape` (not HTML's escaping, Markup's own)."""
    from markupsafe import Markup

    class Escaped(Markup):
        # No __slots__: a text's subclass can have none but empty ones, and `_own` needs a place.
        _own: Spans = NO_SPANS

        def __new__(cls, base: Any = "", encoding: str | None = None, errors: str = "strict") -> Escaped:
            made = super().__new__(cls, base, encoding, errors)
            if type(base) is not str:  # what a macro or a block printed, as Jinja marks it escaped
                own = _own_of(base)
                if own:
                    made._own = own
            return made

        @classmethod
        def escape(cls, s: Any) -> Escaped:
            if hasattr(s, "__html__"):  # escaped already, or marked raw
                text = s.__html__()
                return text if type(text) is cls else cls(text)
            return cls(escape(str(s)))

        # What keeps the template's own text where it is: joining (`~`, `|join`), `+`, and `|trim`.
        def join(self, seq: Iterable[Any]) -> Escaped:
            parts = [self.escape(item) for item in seq]
            made = type(self)(str.join(self, parts))
            own = _joined_own(parts, self)
            if own:
                made._own = own
            return made

        def __add__(self, value: Any) -> Escaped:
            if isinstance(value, str) or hasattr(value, "__html__"):
                return type(self)().join((self, value))
            return NotImplemented

        def __radd__(self, value: Any) -> Escaped:
            if isinstance(value, str) or hasattr(value, "__html__"):
                return type(self)().join((value, self))
            return NotImplemented

        def _cut(self, start: int, end: int) -> Escaped:
            made = type(self)(str.__getitem__(self, slice(start, end)))
            own = _cut_own(self._own, start, end)
            if own:
                made._own = own
            return made

        def strip(self, chars: str | None = None) -> Escaped:
            return self._cut(*_stripped_bounds(self, chars, True, True))

        # A change of case changes what the text shows, not its escapes (_recased); none of it is own then.
        def upper(self) -> Escaped:
            return type(self)(_recased(self, str.upper, escape))

        def lower(self) -> Escaped:
            return type(self)(_recased(self, str.lower, escape))

        def casefold(self) -> Escaped:
            return type(self)(_recased(self, str.casefold, escape))

        def swapcase(self) -> Escaped:
            return type(self)(_recased(self, str.swapcase, escape))

        def title(self) -> Escaped:
            return type(self)(_recased(self, str.title, escape))

        def capitalize(self) -> Escaped:
            return type(self)(_recased(self, str.capitalize, escape))

        def lstrip(self, chars: str | None = None) -> Escaped:
            return self._cut(*_stripped_bounds(self, chars, True, False))

        def rstrip(self, chars: str | None = None) -> Escaped:
            return self._cut(*_stripped_bounds(self, chars, False, True))

    return Escaped


def _own_text(escaped: type[Markup], value: Any) -> Markup:
    """`value` as the template's own text, all of it, unless it is escaped already (a block's text, whose values
    stay values): the template's text itself, and a `|raw` value."""
    if hasattr(value, "__html__"):
        return escaped.escape(value)
    text = str(value)
    return escaped(_with_own(text, _all_own(len(text))))


@functools.cache
def _environment(escape: Escape = None) -> ImmutableSandboxedEnvironment:
    from jinja2 import StrictUndefined, nodes, pass_eval_context
    from jinja2.compiler import CodeGenerator, Frame
    from jinja2.exceptions import SecurityError
    from jinja2.nodes import EvalContext
    from jinja2.runtime import BlockReference, Context, LoopContext, Macro, markup_join, str_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
    from jinja2.utils import Cycler, Joiner, Namespace
    from markupsafe import Markup

    escaped = _escaped_text(escape) if escape is not None else None

    def step() -> None:
        budget = _budget.get()
        if budget is None:  # not rendered by render(): nothing to bound
            return
        budget.steps -= 1
        if budget.steps < 0:
            raise SecurityError(f"more than {MAX_STEPS} loop iterations and calls")
        if not budget.steps % _STEPS_PER_TIME_CHECK and time.thread_time() > budget.deadline:
            raise SecurityError(f"rendering took more than {MAX_RENDER_SECONDS:g} s of processor time")

    def count_iterations(iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            step()
            yield item

    @pass_eval_context
    def concatenate(eval_ctx: EvalContext, *values: Any) -> str:
        """`~`, as Jinja joins its operands, refused before it runs past MAX_MESSAGE: like `+`, it doubles a
        text at each step of `{% set ns.text = ns.text ~ ns.text %}`."""
        refuse_past_limit(_total(written_length(value) for value in values), "~")
        if escaped is None or not eval_ctx.autoescape:
            made = (markup_join if eval_ctx.autoescape else str_join)(values)
        elif any(hasattr(value, "__html__") for value in values):
            made = escaped("").join(values)  # which escapes the others
        else:
            made = str_join(values)
        count_joined(made, "~")
        return made

    def hold(value: Any) -> Any:
        """A list, tuple or dict written in a template, which may keep a new text, or another list, at each step
        of a loop: `{% set ns.l = [ns.l, text ~ "!"] %}` held a gigabyte within a second."""
        held = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        count_held(value, held, "a list or dict")
        return value

    def capture(value: Any) -> Any:
        """What a `{% set %}` block assigned, counted as what a macro prints is: a recursive macro that captures
        `{{ text }}!` in a block and passes it on holds a new text at each level."""
        if isinstance(value, str):  # or what a filter of the block made of it, counted by the filter
            count_joined(value, "a set block")
        return value

    def slice_of(value: Any, start: Any, stop: Any, step: Any) -> Any:
        """`value[start:stop:step]`, as Jinja's code takes it, with the new text or list counted against
        MAX_MADE."""
        made = value[start:stop:step]
        if made is not value:  # `text[:]` is the text itself
            count_copied(made, "a slice")
        return made

    # The functions compile_template puts into the compiled code, which are not the template's steps.
    compiled_in = frozenset(map(id, (count_iterations, concatenate, hold, capture, slice_of)))

    def join_output(pieces: Iterable[str]) -> str:
        """What a macro, a `{% set %}` block, a call block or a filter block prints, joined as Jinja does,
        refused before it is past MAX_MESSAGE: a macro that prints its argument twice, called on its own
        output, doubles a text at each call."""
        pieces = list(pieces)
        refuse_past_limit(_total(map(len, pieces)), "a macro or block")
        return _with_own("".join(pieces), _joined_own(pieces))

    class BoundedFormatter(SandboxedFormatter):
        """The sandbox's str.format, which refuses a field whose width or precision would take the result past
        MAX_MESSAGE before it formats it, and a result that passes it (`"{0}{0}{0}…".format(s)` repeats s)."""

        def __init__(self, env: Environment, what: str, **kwargs: Any) -> None:
            super().__init__(env, **kwargs)
            self.what, self.length = what, 0

        def format_field(self, value: Any, format_spec: str) -> Any:
            refuse_past_limit(self.length + spec_length(format_spec), self.what)
            text = super().format_field(value, format_spec)
            self.length += len(text)
            refuse_past_limit(self.length, self.what)
            count_made(len(text), self.what, text)
            return text

    class BoundedEscapeFormatter(BoundedFormatter, SandboxedEscapeFormatter):
        """Markup's, which escapes what it formats."""

    class OwnTextCodeGenerator(CodeGenerator):
        """Prints the template's own text (compile_template's `own_text_` names) as it is, where Jinja would pass
        it through `escape` and `finalize`, which leave it as it is, at a cost in each iteration of a loop. Inside
        `{% autoescape false %}`, where Jinja would make a plain text of it, it stays the template's own."""

        def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
            if not _is_own_text(node):
                super()._output_child_pre(node, frame, finalize)

        def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
            if not _is_own_text(node):
                super()._output_child_post(node, frame, finalize)

        def visit_FilterBlock(self, node: nodes.FilterBlock, frame: Frame) -> None:
            # Jinja's, with what the filter makes printed as `{{ }}` prints a value: escaped, unless it is escaped
            # text (a block's, as `|upper` or `|trim` make it). Jinja prints it as it is, and `|striptags` makes
            # plain text of the block's escaped values: a value's `<https://elsewhere|a link>` was a link again.
            filter_frame = frame.inner()
            filter_frame.symbols.analyze_node(node)
            self.enter_frame(filter_frame)
            self.buffer(filter_frame)
            self.blockvisit(node.body, filter_frame)
            self.start_write(frame, node)
            escaping = frame.eval_ctx.volatile or frame.eval_ctx.autoescape
            if frame.eval_ctx.volatile:
                self.write("(escape if context.eval_ctx.autoescape else str)(")
            elif escaping:
                self.write("escape(")
            self.visit_Filter(node.filter, filter_frame)
            if escaping:
                self.write(")")
            self.end_write(frame)
            self.leave_frame(filter_frame)

    def _is_own_text(node: nodes.Expr) -> bool:
        return isinstance(node, nodes.InternalName) and node.name.startswith(OWN_TEXT)

    class Environment(ImmutableSandboxedEnvironment):
        if escaped is not None:
            code_generator_class = OwnTextCodeGenerator

        # The sandbox bounds range() but not what these make: each is checked before it runs.
        intercepted_binops = frozenset({"*", "+", "%", "**"})

        def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
            if escaped is not None:
                # A macro's output is Jinja's Markup, whose `+` and `%` would escape the other operand as HTML.
                left, right = (
                    escaped(value) if isinstance(value, Markup) and type(value) is not escaped else value
                    for value in (left, right)
                )
            counted = 0  # by check_length, for the one object the operator makes
            if operator == "*":
                sequence, times = (right, left) if isinstance(left, int) else (left, right)
                if isinstance(sequence, str) and isinstance(times, int):
                    counted = len(sequence) * times
                    check_length(counted, "*")
                elif isinstance(sequence, list | tuple) and isinstance(times, int) and times > 1:
                    # Its items and their separators `times` over, its brackets once.
                    counted = 2 + (written_length(sequence) - 2) * times
                    check_length(counted, "*", type(sequence).__name__)
            elif operator == "+" and isinstance(left, list | tuple) and isinstance(right, list | tuple):
                # `{% set ns.items = ns.items + ns.items %}` doubles a list's text at each step. What it adds to
                # the render's total is the shorter operand: the new list refers to the items both hold, and
                # one built up item by item (`ns.items + [item]`) lets the old one go. Counted whole, its every
                # length so far added up, a list of a thousand short items was refused.
                left_length, right_length = known_length(left), known_length(right)
                refuse_past_limit(left_length + right_length, "+", type(left).__name__)
                count_made(min(left_length, right_length), "+")
                made = super().call_binop(context, operator, left, right)
                remember_length(made, left_length + right_length - 2)  # one pair of brackets
                return made
            elif operator == "+" and isinstance(left, str) and isinstance(right, str):
                # `{% set ns.text = ns.text + ns.text %}` doubles a text at each step: forty steps make a
                # terabyte. The new text is counted once made (count_joined).
                refuse_past_limit(len(left) + len(right), "+")
            elif operator == "%" and isinstance(left, str):
                counted = printf_length(left, right)
                check_length(counted, "%")
            elif operator == "**":
                counted = power_length(left, right)
                check_length(counted, "**", "number")
            made = super().call_binop(context, operator, left, right)
            track(made, counted)
            if operator == "+" and isinstance(left, str) and isinstance(right, str):
                count_joined(made, "+")
            return made

        # compile_template() makes every `{% for %}` loop over `environment.counted(<what it names>)`.
        counted = staticmethod(count_iterations)
        # ... and every `a ~ b` into `environment.concatenated(a, b)`.
        concatenated = staticmethod(concatenate)
        # ... and every list, tuple or dict written in it but a constant one into `environment.held(<it>)`.
        held = staticmethod(hold)
        # ... and what every `{% set %}` block assigns into `environment.captured(<it>)`.
        captured = staticmethod(capture)
        # ... and every slice of what is not a constant into `environment.sliced(<it>, start, stop, step)`.
        sliced = staticmethod(slice_of)
        # The compiled code joins what a macro or a block prints with `environment.concat`.
        concat = staticmethod(join_output)

        # Every call a template makes passes here: a macro that calls itself twice cannot run for ever.
        def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            made = self._call(context, obj, *args, **kwargs)
            if escaped is not None and isinstance(made, Markup) and type(made) is not escaped:
                # What a block prints (`self.name()`, `super()`) is Jinja's Markup, whose format, `%`, join
                # and replace escape their arguments as HTML, which leaves a chat's mentions as they are.
                made = escaped(made)
            if isinstance(obj, Macro | BlockReference) and isinstance(made, str):
                # Counted here, not as join_output makes it: with escaping, Markup copies it into another text.
                count_joined(made, "a macro" if isinstance(obj, Macro) else "a block")
            return made

        def _call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            if id(obj) not in compiled_in:  # compile_template's, not one the template makes
                step()
            if isinstance(obj, LoopContext) and args:  # `loop(item.children)` in a recursive loop
                args = (count_iterations(args[0]), *args[1:])
            owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", None)
            if obj is dict:
                return made_dict(super().call(context, obj, *args, **kwargs), args, kwargs)
            if isinstance(obj, Macro) and (obj.catch_varargs or obj.catch_kwargs):
                # What the call passes past the macro's arguments, which Jinja holds for it in `varargs` (a tuple)
                # and `kwargs` (a dict): the macro may keep them (`{% set ns.d = [ns.d, varargs] %}`), and a text
                # made for the call (`keep(text ~ "!")`) is counted nowhere else. Their holders are Jinja's, and
                # not counted: a few references each.
                passed = [
                    *args[len(obj.arguments) :],
                    *(
                        value
                        for key, value in kwargs.items()
                        if key not in obj.arguments and key not in _JINJA_KWARGS
                    ),
                ]
                count_held(None, passed, "a macro's varargs or kwargs")
            if obj in (Namespace, Cycler, Joiner):  # each keeps what it is given, as a list does
                kept = [*args, *(value for key, value in kwargs.items() if key not in _JINJA_KWARGS)]
                made = super().call(context, obj, *args, **kwargs)
                count_held(made, kept, f"{_HOLDERS[obj.__name__]}()")
                return made
            if isinstance(owner, str) and name not in _STR_METHODS and name not in ("format", "format_map"):
                # upper, lower, split and the like: no longer than the text, but new, and a dict or list may keep
                # each: counted against MAX_MADE, as the filters are (_count_made_by). format and format_map
                # count what they make as they make it (BoundedFormatter).
                made = super().call(context, obj, *args, **kwargs)
                if made is not owner:
                    count_result(made, f"str.{name}")
                return made
            if isinstance(owner, str) and name in _STR_METHODS:
                length, signature = _STR_METHODS[name]
                if name == "join" and args:  # iterated here, to be measured, and then joined
                    args = (list(args[0]), *args[1:])
                given = {key: value for key, value in kwargs.items() if key not in _JINJA_KWARGS}
                counted = _length_of(length, signature, (owner, *args), given)
                check_length(counted, f"str.{name}")
                made = super().call(context, obj, *args, **kwargs)
                track(made, counted)
                return made
            if name == "copy" and isinstance(owner, list | dict):
                made = super().call(context, obj, *args, **kwargs)
                count_copied(made, f"{type(owner).__name__}.copy")
                return made
            if name == "fromkeys" and isinstance(owner, type) and issubclass(owner, dict):
                if args:  # iterated here, to be measured, and then made a dict of
                    args = (list(args[0]), *args[1:])
                given = {key: value for key, value in kwargs.items() if key not in _JINJA_KWARGS}
                counted = _length_of(dict_length, _FROMKEYS, args, given)
                check_length(counted, "dict.fromkeys", "dict")
                made = super().call(context, obj, *args, **kwargs)
                track(made, counted)
                return made
            return super().call(context, obj, *args, **kwargs)

        # map, select, reject, selectattr and rejectattr apply a filter or test to each item through these:
        # each application is a step, as a loop's iteration is.
        def call_filter(self, *args: Any, **kwargs: Any) -> Any:
            step()
            return super().call_filter(*args, **kwargs)

        def call_test(self, *args: Any, **kwargs: Any) -> Any:
            step()
            return super().call_test(*args, **kwargs)

        def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
            # Jinja's sandboxed str.format and format_map, with a formatter that bounds what they make.
            sandboxed = super().wrap_str_format(value)
            if sandboxed is None:  # not a text's format or format_map
                return None
            text: str = value.__self__
            name: str = value.__name__

            def bounded_format(*args: Any, **kwargs: Any) -> str:
                if name == "format_map":
                    if kwargs or len(args) != 1:
                        return sandboxed(*args, **kwargs)  # which fails, saying why
                    kwargs, args = args[0], ()
                what = f"str.{name}"
                formatter = (
                    BoundedEscapeFormatter(self, what, escape=text.escape)
                    if isinstance(text, Markup)
                    else BoundedFormatter(self, what)
                )
                return type(text)(formatter.vformat(text, args, kwargs))

            return functools.update_wrapper(bounded_format, value)

    # Sandboxed because templates come from the config, which may be edited by people who must not get code
    # execution in the gateway; immutable so a template cannot change the event other actions see.
    # With escaping, a `finalize` that takes the evaluation context: Jinja then prints a constant in `{{ }}` (a
    # text, a filter of one) at run time, through `escape`, where it would have escaped it as HTML when compiling
    # the template: `{{ "<b>" }}` showed `&lt;b&gt;` in Discord, and `{{ "@everyone" }}` was left as it is.
    env = Environment(
        autoescape=escaped is not None,
        undefined=StrictUndefined,
        finalize=None if escaped is None else pass_eval_context(lambda eval_ctx, value: value),
    )
    env.filters["isotime"] = isotime
    if escape is None or escaped is None:
        env.filters["raw"] = env.filters["safe"] = _as_it_is
    else:
        _escape_with(env, escaped, escape)
    _bound_growth(env)
    return env


def _as_it_is(value: Any) -> Any:
    """`|raw` where nothing is escaped."""
    return value


def _escape_with(
    env: ImmutableSandboxedEnvironment, escaped: type[Markup], escape: Callable[[str], str]
) -> None:
    """The filters of an environment that escapes values with `escaped.escape` (`escape`) instead of HTML's
    escaping, which Jinja's filters apply themselves where they mix a value with Markup."""
    from jinja2 import pass_eval_context
    from jinja2.filters import do_indent, do_title, do_tojson, do_urlize, do_xmlattr, make_attrgetter
    from jinja2.nodes import EvalContext

    def raw(value: Any) -> Markup:
        return _own_text(escaped, value)

    def force_escape(value: Any) -> Markup:
        return escaped(escaped.escape(str(value)))

    def replace(value: Any, old: Any, new: Any, count: Any = None) -> str:
        times = -1 if count is None else count
        if hasattr(value, "__html__"):
            return escaped(value).replace(old, new, times)  # which escapes `new`
        if hasattr(new, "__html__") and str(old):  # a value's text replaced with raw text
            return escaped.escape(new).join(str(value).split(str(old), times))  # which escapes the parts
        return str(value).replace(str(old), str(new), times)

    @pass_eval_context
    def join(eval_ctx: EvalContext, value: Iterable[Any], d: Any = "", attribute: Any = None) -> str:
        if attribute is not None:
            value = map(make_attrgetter(eval_ctx.environment, attribute), value)
        items = list(value)
        if hasattr(d, "__html__") or any(hasattr(item, "__html__") for item in items):
            return escaped.escape(d).join(items)  # which escapes the items
        return str(d).join(map(str, items))

    def indent(value: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
        # Jinja's marks a text `width` as escaped where it indents escaped text (a block's): a value's was
        # printed as it is, its `<https://elsewhere|a link>` a link.
        if hasattr(value, "__html__") and isinstance(width, str):
            width = escaped.escape(width)
        return do_indent(value, width, first, blank)

    def title(value: Any) -> str:
        # Jinja's makes a plain text of escaped text (a block's), which was then escaped again: `&amp;amp;`.
        if hasattr(value, "__html__"):
            return escaped(_recased(escaped.escape(value), do_title, escape))
        return do_title(value)

    def as_value(function: Callable[..., Any]) -> Callable[..., Any]:
        """A filter that writes HTML (or JSON safe in HTML), its result printed as a value: escaped."""

        @functools.wraps(function)
        def written(*args: Any, **kwargs: Any) -> str:
            return str(function(*args, **kwargs))

        return written

    env.filters.update(
        raw=raw,
        safe=raw,
        e=escaped.escape,
        escape=escaped.escape,
        forceescape=force_escape,
        replace=replace,
        join=join,
        indent=indent,
        title=title,
        tojson=as_value(do_tojson),
        urlize=as_value(do_urlize),
        xmlattr=as_value(do_xmlattr),
    )


def compile_template(source: str, escape: Escape = None) -> Template:
    """Compile a message template; raises ValueError naming the line of a syntax error. With `escape`, a
    function of a text that returns it escaped for the message's format, every value the template prints is
    escaped with it, and its own text, a value marked `|raw` or `|safe`, and what a macro or a block prints
    (its values escaped already) are printed as they are."""
    from jinja2 import TemplateSyntaxError, nodes
    from jinja2.visitor import NodeTransformer

    # The template's own text, by the name the compiled code prints it from (_escape_output).
    own_texts: dict[str, str] = {}

    class BoundedConcat(NodeTransformer):
        def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Expr:
            # Jinja prints its text as a constant of the compiled code, a plain text like any other. With escaping,
            # it is printed from a name instead, whose text knows it is the template's own.
            if escape is None:
                return node
            name = f"{OWN_TEXT}{len(own_texts)}"
            own_texts[name] = node.data
            # As Jinja's parser makes its own internal names (Parser.free_identifier): printed as a bare name.
            internal = object.__new__(nodes.InternalName)
            nodes.Node.__init__(internal, name, lineno=node.lineno)
            return internal

        def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
            operands = [self.visit(operand) for operand in node.nodes]
            concatenated = nodes.EnvironmentAttribute("concatenated", lineno=node.lineno)
            return nodes.Call(concatenated, operands, [], None, None, lineno=node.lineno)

        def visit_List(self, node: nodes.List) -> nodes.Expr:
            self.generic_visit(node)  # which changes it in place
            return held(node)

        def visit_Tuple(self, node: nodes.Tuple) -> nodes.Expr:
            self.generic_visit(node)
            return held(node) if node.ctx == "load" else node  # not `{% for a, b in … %}`'s names

        def visit_Dict(self, node: nodes.Dict) -> nodes.Expr:
            self.generic_visit(node)
            return held(node)

        def visit_Getitem(self, node: nodes.Getitem) -> nodes.Expr:
            # Jinja's code takes a slice itself, past the environment's getitem.
            self.generic_visit(node)
            if not isinstance(node.arg, nodes.Slice) or isinstance(node.node, nodes.Const):
                return node
            parts = (node.arg.start, node.arg.stop, node.arg.step)
            bounds = [nodes.Const(None) if part is None else part for part in parts]
            sliced = nodes.EnvironmentAttribute("sliced", lineno=node.lineno)
            return nodes.Call(sliced, [node.node, *bounds], [], None, None, lineno=node.lineno)

        def visit_AssignBlock(self, node: nodes.AssignBlock) -> nodes.Node | list[nodes.Node]:
            # Jinja's code joins what the block prints and assigns it (as Markup, a copy, when it escapes) where
            # no hook sees the text assigned: it is passed to `environment.captured` once assigned.
            self.generic_visit(node)
            target = node.target
            if isinstance(target, nodes.Name):
                stored: nodes.Expr = nodes.Name(target.name, "store")
                assigned: nodes.Expr = nodes.Name(target.name, "load")
            elif isinstance(target, nodes.NSRef):  # `{% set ns.text %}`
                stored = nodes.NSRef(target.name, target.attr)
                assigned = nodes.Getattr(nodes.Name(target.name, "load"), target.attr, "load")
            else:  # `{% set a, b %}`: single characters of it
                return node
            captured = nodes.EnvironmentAttribute("captured")
            counted = nodes.Call(captured, [assigned], [], None, None)
            return [node, nodes.Assign(stored, counted).set_lineno(node.lineno)]

    def held(node: nodes.Expr) -> nodes.Expr:
        if constant(node):  # made of the template's own text: it keeps nothing a render made
            return node
        return nodes.Call(nodes.EnvironmentAttribute("held"), [node], [], None, None, lineno=node.lineno)

    def constant(node: nodes.Node) -> bool:
        if isinstance(node, nodes.List | nodes.Tuple):
            return all(constant(item) for item in node.items)
        if isinstance(node, nodes.Dict):
            return all(constant(pair.key) and constant(pair.value) for pair in node.items)
        return isinstance(node, nodes.Const)

    env = _environment(escape)
    try:
        # `~` joins its operands as `environment.concatenated(…)`, which bounds what it makes: Jinja joins
        # them in the compiled code, where no hook of the environment sees it.
        tree = BoundedConcat().visit(env.parse(source))
        # Each loop counts its iterations, as `environment.counted(<what it loops over>)`: Jinja has a hook
        # for calls, none for iteration.
        for loop in list(tree.find_all(nodes.For)):
            counted = nodes.EnvironmentAttribute("counted", lineno=loop.iter.lineno)
            loop.iter = nodes.Call(counted, [loop.iter], [], None, None, lineno=loop.iter.lineno)
        tree.set_environment(env)
        template = env.from_string(tree)  # an unknown filter or test is found here
    except TemplateSyntaxError as exc:
        raise ValueError(f"line {exc.lineno}: {exc.message}") from None
    if escape is not None:
        _escape_output(template, _escaped_text(escape), own_texts)
    return template


def _escape_output(template: Template, escaped: type[Markup], own_texts: dict[str, str]) -> None:
    """Makes the compiled code of `template` escape with `escaped`: Jinja's code prints a value through the
    `escape` of its module, marks what a block prints as its `Markup`, and makes macros of its `Macro`, all
    HTML's. And gives it the template's own texts, by the names it prints them from."""
    from jinja2.runtime import Macro

    class EscapedMacro(Macro):
        def _invoke(self, arguments: list[Any], autoescape: bool) -> str:
            # Jinja's Macro marks what it prints as HTML's Markup, a copy that would not know its own text.
            made = self._func(*arguments)
            return escaped(made) if autoescape else made

    namespace = template.root_render_func.__globals__
    namespace.update(escape=escaped.escape, Markup=escaped, Macro=EscapedMacro)
    namespace.update((name, _own_text(escaped, text)) for name, text in own_texts.items())


def render(template: Template, context: dict[str, Any]) -> str:
    """The message `template` makes of `context`; raises past MAX_MESSAGE, MAX_STEPS or MAX_RENDER_SECONDS. Of a
    template compiled with an `escape`, it knows which of its characters are the template's own (owns)."""
    token = _budget.set(_Budget(MAX_STEPS, time.thread_time() + MAX_RENDER_SECONDS))
    try:
        # Rendered piece by piece, so that a message that grows past the limit stops there.
        pieces: list[str] = []
        length = 0
        for piece in template.generate(context):
            length += len(piece)
            if length > MAX_MESSAGE:
                raise ValueError(f"the message is longer than {MAX_MESSAGE} characters")
            pieces.append(piece)
        message = "".join(pieces)
        start, end = _stripped_bounds(message, None, True, True)
        own = _cut_own(_joined_own(pieces), start, end)
        own.pairs()  # worked out here, within MAX_RENDER_SECONDS
        return _with_own(message[start:end], own)
    finally:
        _budget.reset(token)
