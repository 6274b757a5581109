"""
nginx's value syntaxes: sizes, times, flags and numbers.

Each parser follows the nginx function it is named after (C{ngx_parse_size},
C{ngx_parse_time}, C{ngx_conf_set_flag_slot}, C{ngx_atoi}) and raises L{ValueError}
with a message the directive table turns into a L{ConfigError} naming the directive.
"""

from __future__ import annotations

from typing import Literal

_DIGITS = frozenset("0123456789")

# NGX_MAX_INT_T_VALUE and NGX_MAX_SIZE_T_VALUE on a 64-bit build.
_MAX_INT = 2**63 - 1

# NGX_MAX_INT32_VALUE: the largest time nginx keeps, in its slot's resolution.
_MAX_TIME = 2**31 - 1

_SIZE_SCALES = {
    "k": 1024,
    "K": 1024,
    "m": 1024 * 1024,
    "M": 1024 * 1024,
    "g": 1024 * 1024 * 1024,
    "G": 1024 * 1024 * 1024,
}

# Time units from the largest to the smallest; a value must name them in this order.
_YEAR, _MONTH, _WEEK, _DAY, _HOUR, _MINUTE, _SECOND, _MILLISECOND, _BARE = range(1, 10)

_TIME_UNITS = {
    "y": (_YEAR, 60 * 60 * 24 * 365),
    "M": (_MONTH, 60 * 60 * 24 * 30),
    "w": (_WEEK, 60 * 60 * 24 * 7),
    "d": (_DAY, 60 * 60 * 24),
    "h": (_HOUR, 60 * 60),
    "m": (_MINUTE, 60),
    "s": (_SECOND, 1),
}


def _atoi(text: str) -> int | None:
    """
    C{ngx_atoi}: a non-empty run of ASCII digits no larger than C{2**63 - 1}, or
    L{None}.
    """
    if not text or not _DIGITS.issuperset(text):
        return None
    value = int(text)
    if value > _MAX_INT:
        return None
    return value


def parseSize(text: str) -> int:
    """
    Parse an nginx size (C{1024}, C{8k}, C{20m}, C{1g}; units in either case) into
    bytes, as C{ngx_parse_size} and C{ngx_parse_offset} do.

    @raise ValueError: C{invalid value "20x"}.
    """
    digits, scale = text, 1
    if text and text[-1] in _SIZE_SCALES:
        digits, scale = text[:-1], _SIZE_SCALES[text[-1]]
    value = _atoi(digits)
    if value is None or value > _MAX_INT // scale:
        raise ValueError(f'invalid value "{text}"')
    return value * scale


def parseTime(text: str, resolution: Literal["ms", "s"] = "ms") -> float:
    """
    Parse an nginx time into seconds, as C{ngx_parse_time} does.

    Units are C{ms}, C{s}, C{m}, C{h}, C{d}, C{w}, C{M} (30 days) and C{y} (365 days),
    written from the largest to the smallest, together (C{1h30m}) or apart
    (C{1h 30m}); a bare number is seconds.

    @param resolution: the resolution of the nginx directive: C{"ms"} for the
        directives nginx keeps in milliseconds (C{ngx_conf_set_msec_slot}: the
        timeouts), which accept C{ms} but not C{M} or C{y} and stop at 2**31-1 ms
        (about 24.8 days); C{"s"} for those kept in seconds
        (C{ngx_conf_set_sec_slot}: C{ssl_session_timeout}, C{fail_timeout}), which
        accept C{M} and C{y} but not C{ms} and stop at 2**31-1 s (about 68 years).

    @raise ValueError: C{invalid value "4x"}, or a value past the limit.
    """
    inSeconds = resolution == "s"
    unitScale = 1 if inSeconds else 1000
    step = 0 if inSeconds else _MONTH
    total = 0
    value = 0
    valid = False
    position = 0
    end = len(text)

    def invalid() -> ValueError:
        return ValueError(f'invalid value "{text}"')

    while position < end:
        ch = text[position]
        position += 1
        if ch in _DIGITS:
            value = value * 10 + int(ch)
            valid = True
            continue

        if ch == "m" and position < end and text[position] == "s":
            position += 1
            if inSeconds or step >= _MILLISECOND:
                raise invalid()
            step, scale = _MILLISECOND, 1
        elif ch in _TIME_UNITS:
            unit, seconds = _TIME_UNITS[ch]
            # nginx lets "y" follow nothing but the start; the others must come
            # strictly after the previous unit.
            if step >= unit:
                raise invalid()
            step, scale = unit, seconds * unitScale
        elif ch == " ":
            if step >= _SECOND:
                raise invalid()
            step, scale = _BARE, unitScale
        else:
            raise invalid()

        total += value * scale
        if total > _MAX_TIME:
            raise _tooLarge(text, resolution)
        value = 0
        while position < end and text[position] == " ":
            position += 1

    if not valid:
        raise invalid()
    total += value * unitScale
    if total > _MAX_TIME:
        raise _tooLarge(text, resolution)
    return float(total) if inSeconds else total / 1000


def _tooLarge(text: str, resolution: Literal["ms", "s"]) -> ValueError:
    """
    The error for a time past what nginx keeps at C{resolution}.
    """
    about = "68 years" if resolution == "s" else "24.8 days"
    return ValueError(
        f'invalid value "{text}", it must not exceed {_MAX_TIME}{resolution} '
        f"(about {about})"
    )


def parseFlag(text: str) -> bool:
    """
    Parse C{on} or C{off} (in any case), as C{ngx_conf_set_flag_slot} does.

    @raise ValueError: C{invalid value "x", it must be "on" or "off"}.
    """
    lowered = text.lower()
    if lowered == "on":
        return True
    if lowered == "off":
        return False
    raise ValueError(f'invalid value "{text}", it must be "on" or "off"')


def parseInt(text: str, minimum: int = 0, maximum: int | None = None) -> int:
    """
    Parse a non-negative decimal number, as C{ngx_atoi} does (no sign, no spaces),
    and check it lies within C{minimum} and C{maximum}.

    @raise ValueError: C{invalid number "x"}, or C{invalid value "0", it must be
        equal or more than 1}.
    """
    value = _atoi(text)
    if value is None:
        raise ValueError(f'invalid number "{text}"')
    if value < minimum or (maximum is not None and value > maximum):
        if maximum is None:
            bounds = f"equal or more than {minimum}"
        else:
            bounds = f"between {minimum} and {maximum}"
        raise ValueError(f'invalid value "{text}", it must be {bounds}')
    return value
