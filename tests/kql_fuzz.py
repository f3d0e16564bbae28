"""Hypothesis strategies for the fuzz suite (tests/test_fuzz.py): KQL text that follows
grammar/kql.lark, then mutated.

:data:`STATEMENTS` draw the tokens of one statement of every form (OCCLUDE with any
clauses in any order, EXPLAIN [ANALYZE], SET, LOAD MODEL / IMAGE, SHOW, CALIBRATE [ON],
CALIBRATE <model> ON ...), each value sometimes of the wrong kind for its place (a string
for PATCH, a name for COLOR, a number for INTO). :func:`queries` joins one to three of them
with odd spacing, comments and keyword case, then mutates the tokens (truncated, deleted,
swapped, doubled, replaced by huge or negative numbers) and the characters (NUL, lone
surrogates, ANSI escapes, any code point, cut anywhere), and sometimes blows one token up
to 100 KB. :func:`hostile_query` is round two (issue 32): a seeded generator of its own,
aimed at numeric extremes, WHERE on text, clause order, unicode, nesting and root globs.

>>> from hypothesis import find
>>> text = find(queries(), lambda t: t.startswith("OCCLUDE") and "PATCH" in t)
>>> text.split()[0]
'OCCLUDE'
"""

from __future__ import annotations

from hypothesis import strategies as st

# -- values ------------------------------------------------------------------------------------

def _weighted(*choices):
    """One of the strategies, each ``(weight, strategy)`` drawn ``weight`` times in the sum."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


ODD_CHARS = ["\x00", "\udd45", "\udc80", "\ud800", "\u2028", "\x1b[31m", "\t", "\r", "\x7f",
             "\u200b", "\ufeff", "é", "猫", "\U0001F431", "\x85", "'", '"', "''", "\\", "--"]
_CHAR = st.one_of(st.sampled_from(list("abcxyzXYZ09 _-./*?")), st.sampled_from(ODD_CHARS),
                  st.integers(0, 0x10FFFF).map(chr))
TEXT = st.lists(_CHAR, max_size=10).map("".join)

SMALL = st.integers(0, 40).map(str)
HUGE = st.one_of(st.sampled_from(["2147483647", "2147483648", "9223372036854775808",
                                  "18446744073709551616", "1" + "0" * 5000, "0" * 5000 + "7"]),
                 st.integers(11, 400).map(lambda n: "9" * n))
FLOAT = st.sampled_from(["0.5", ".25", "1.", "0.9", "1e999", "1e-400", "2.5e3", "1E+2",
                         "1" * 400 + ".0", "0.0", "1.0", "3e38", "1e308"])
NUMBER = _weighted((6, SMALL), (1, FLOAT), (1, HUGE), (1, SMALL.map(lambda n: "-" + n)))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


FILES = ["'map.png'", "'map.npy'", "'map.parquet'", "'sub/map.png'", "'map.jpg'", "'map'",
         "'/no/such/dir/x.png'", "'.'", "''", "'missing.png'", "'m.pt'", "'*.png'",
         "'**/*.png'", "'labels.txt'"]
STRING = st.one_of(st.sampled_from(FILES), TEXT.map(_quote), TEXT.map(lambda t: '"' + t + '"'))
NAME = st.one_of(st.sampled_from(["img", "net", "nope", "x", "batch", "strategy", "crossover",
                                  "tau", "gates", "memory_limit", "confirm_seconds", "patch",
                                  "on", "resnet18", "efficientnet_lite0", "_", "a1", "sample"]),
                 st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True))
PUNCT = st.sampled_from(["(", ")", ",", ";", "=", ">=", "x", "-", ".", "*", "'", '"'])
# A value of any kind: what a clause gets when it is given the wrong type.
ANY = st.one_of(NUMBER, STRING, NAME, PUNCT, st.sampled_from(["black", "gpu", "PREDICTED"]))


def _sometimes_wrong(right):
    """Mostly ``right`` (a strategy of token lists), sometimes one value of any kind."""
    return _weighted((5, right), (1, ANY.map(lambda v: [v])))


def _number_list(low: int, high: int):
    return st.lists(NUMBER, min_size=low, max_size=high).map(
        lambda ns: ["(", *sum(([n, ","] for n in ns), [])[:-1], ")"])


# -- images, models, clauses ------------------------------------------------------------------

IMAGE = _weighted((6, st.just(["img"])), (2, st.just(["vol"])), (1, st.just(["sample", "(", "'chelsea'", ")"])),
                  (1, st.just(["nope"])), (1, STRING.map(lambda s: [s])),
                  (1, STRING.map(lambda s: ["sample", "(", s, ")"])))
LIGHT_MODEL = _weighted((6, st.just(["net"])), (2, st.just(["net3"])), (1, st.just(["nope"])),
                        (1, NAME.map(lambda n: [n])))
# The built-in model and a torchvision name (no weights here) cost seconds to load once.
MODEL = _weighted((8, LIGHT_MODEL), (1, st.just(["efficientnet_lite0"])), (1, st.just(["resnet18"])))
SIZE = st.one_of(NUMBER.map(lambda n: [n]), st.tuples(NUMBER, NUMBER).map(lambda t: [t[0], "x", t[1]]),
                 st.tuples(NUMBER, NUMBER, NUMBER).map(lambda t: [t[0], "x", t[1], "x", t[2]]))
COLOR = st.one_of(st.sampled_from([["black"], ["gray"], ["grey"], ["white"], ["mean"],
                                   ["gaussian"], ["mean_patch"]]),
                  _number_list(1, 5), NUMBER.map(lambda n: ["(", "-", n, ")"]))
ONE_TARGET = st.one_of(NUMBER.map(lambda n: [n]), STRING.map(lambda s: [s]),
                       st.sampled_from([["PREDICTED"], ["'a'"], ["'e'"]]))
TARGET = st.one_of(ONE_TARGET, NUMBER.map(lambda n: ["TOP", n]),
                   st.lists(ONE_TARGET, min_size=0, max_size=4).map(
                       lambda ts: ["(", *sum(([*t, ","] for t in ts), [])[:-1], ")"]))
DEVICE = st.sampled_from(["cpu", "gpu", "auto", "CPU", "Auto"])

OCCLUSION_CLAUSES = [
    _sometimes_wrong(SIZE).map(lambda v: ["PATCH", *v]),
    _sometimes_wrong(SIZE).map(lambda v: ["STRIDE", *v]),
    _sometimes_wrong(COLOR).map(lambda v: ["COLOR", *v]),
]
CLAUSES = OCCLUSION_CLAUSES + [
    _sometimes_wrong(TARGET).map(lambda v: ["TARGET", *v]),
    _sometimes_wrong(_number_list(3, 7)).map(lambda v: ["REGION", *v]),
    _sometimes_wrong(NUMBER.map(lambda n: [n])).map(lambda v: ["WITH", "SSIM", ">=", *v]),
    st.tuples(NUMBER, st.none() | NUMBER).map(
        lambda t: ["DRILLDOWN", t[0]] + ([] if t[1] is None else ["SPEEDUP", t[1]])),
    _sometimes_wrong(DEVICE.map(lambda d: [d])).map(lambda v: ["ON", *v]),
    _sometimes_wrong(NUMBER.map(lambda n: [n])).map(lambda v: ["BATCH", *v]),
    _sometimes_wrong(STRING.map(lambda s: [s])).map(lambda v: ["INTO", *v]),
    _sometimes_wrong(st.sampled_from([["squash"], ["crop"], ["pad"]])).map(lambda v: ["RESIZE", *v]),
    _sometimes_wrong(st.sampled_from([["softmax"], ["sigmoid"], ["logits"], ["probability"]])).map(
        lambda v: ["OUTPUT", *v]),
]


@st.composite
def _clauses(draw, choices, most: int = 5) -> list:
    """Up to ``most`` different clauses in any order (a repeated one is a token mutation)."""
    picked = draw(st.lists(st.integers(0, len(choices) - 1), unique=True, max_size=most))
    return sum((draw(choices[i]) for i in picked), [])


# -- statements ----------------------------------------------------------------------------------

def _occlude(model):
    return st.tuples(IMAGE, model, _clauses(CLAUSES)).map(
        lambda t: ["OCCLUDE", *t[0], "USING", *t[1], *t[2]])


SETTING_VALUES = st.one_of(st.sampled_from(["'naive'", "'incremental'", "'auto'", "'none'",
                                            "'frozen'", "'exact'", "'4gb'", "'0.5 mb'", "'x'",
                                            "0.5", "1", "0", "600", "naive"]), NUMBER, STRING, NAME,
                           st.tuples(st.one_of(SMALL, HUGE, FLOAT), st.sampled_from(["kb", " GB", "tb"]))
                           .map(lambda t: f"'{t[0]}{t[1]}'"))
IMAGES = st.one_of(STRING.map(lambda s: [s]), st.lists(IMAGE, min_size=0, max_size=3).map(
    lambda ims: ["(", *sum(([*im, ","] for im in ims), [])[:-1], ")"]))


def _optional(tokens):
    return st.one_of(st.just([]), tokens)


def _statement(model):
    occlude = _occlude(model)
    return _weighted((3, occlude), (1, st.one_of(
        st.tuples(st.booleans(), occlude).map(
            lambda t: ["EXPLAIN", *(["ANALYZE"] if t[0] else []), *t[1]]),
        st.tuples(NAME, SETTING_VALUES).map(lambda t: ["SET", t[0], "=", t[1]]),
        st.tuples(NAME, STRING, _optional(st.one_of(NAME.map(lambda n: ["ARCH", n]),
                                                NAME.map(lambda n: ["ARCH", "timm", ":", n]),
                                                # never a real module: a factory runs code
                                                st.sampled_from([["ARCH", "'kql_no_such_mod:make'"],
                                                                 ["ARCH", "'no_colon'"],
                                                                 ["ARCH", "''"]]))),
                  _optional(STRING.map(lambda s: ["LABELS", s]))).map(
            lambda t: ["LOAD", "MODEL", t[0], "FROM", t[1], *t[2], *t[3]]),
        st.tuples(NAME, STRING).map(lambda t: ["LOAD", "IMAGE", t[0], "FROM", t[1]]),
        st.sampled_from([["SHOW", "MODELS"], ["SHOW", "IMAGES"]]),
        _optional(DEVICE.map(lambda d: ["ON", d])).map(lambda on: ["CALIBRATE", *on]),
        st.tuples(model, IMAGES, _clauses(OCCLUSION_CLAUSES, 3)).map(
            lambda t: ["CALIBRATE", *t[0], "ON", *t[1], *t[2]]),
    )))


# By ``heavy_models`` (see :func:`queries`).
STATEMENTS = {True: _statement(MODEL), False: _statement(LIGHT_MODEL)}

KEYWORDS = frozenset("""OCCLUDE USING TARGET PREDICTED PATCH STRIDE COLOR REGION WITH SSIM
    DRILLDOWN SPEEDUP ON BATCH INTO EXPLAIN ANALYZE LOAD MODEL IMAGE FROM ARCH LABELS SHOW MODELS
    IMAGES SET CALIBRATE SAMPLE TOP RESIZE OUTPUT""".split())
KEYWORD_CASE = st.sampled_from([str.upper, str.lower, str.title, str])
SEPARATOR = st.sampled_from([" "] * 12 + ["  ", "\n", "\t", " -- note\n", "\r\n", ""])


# -- mutations ------------------------------------------------------------------------------------

@st.composite
def _mutate_tokens(draw, tokens: list) -> list:
    tokens = list(tokens)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        if not tokens:
            break
        i, j = draw(st.integers(0, len(tokens) - 1)), draw(st.integers(0, len(tokens) - 1))
        kind = draw(st.sampled_from(["truncate", "delete", "swap", "double", "insert", "replace",
                                     "huge", "negative"]))
        if kind == "truncate":
            tokens = tokens[:i]
        elif kind == "delete":
            del tokens[i]
        elif kind == "swap":
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == "double":
            tokens.insert(i, tokens[i])
        elif kind == "insert":
            tokens.insert(i, draw(ANY))
        elif kind == "replace":
            tokens[i] = draw(ANY)
        elif kind == "huge":
            tokens[i] = draw(HUGE)
        else:
            tokens[i] = "-" + tokens[i]
    return tokens


@st.composite
def _mutate_text(draw, text: str) -> str:
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "insert", "cut", "drop"]))
        if kind == "insert":
            text = text[:at] + draw(st.one_of(st.sampled_from(ODD_CHARS), _CHAR)) + text[at:]
        elif kind == "cut":
            text = text[:at]
        else:
            text = text[:at] + text[at + 1:]
    return text


def _blow_up(token: str, size: int) -> str:
    """``token`` grown to about ``size`` characters: a longer string, name or number, or
    a keyword or punctuation said over and over."""
    if token[:1] in "'\"" and len(token) >= 2:
        return token[0] + (token[1:-1] or "a") * (size // max(1, len(token) - 2)) + token[-1]
    if token.upper() in KEYWORDS or not (token.isalnum() or "_" in token):
        token += " "
    return token * (size // max(1, len(token)))


@st.composite
def queries(draw, heavy_models: bool = True) -> str:
    """KQL text: one to three statements from the grammar, mutated (see the module doc);
    a third of them are left as the grammar made them, to reach the planner's checks.
    The models are ``net``, unknown names and, with ``heavy_models``, ``efficientnet_lite0``
    and ``resnet18``."""
    statements = draw(st.lists(STATEMENTS[heavy_models], min_size=1, max_size=3))
    tokens = sum((s + [";"] for s in statements), [])[:-1 if draw(st.booleans()) else None]
    mutated = draw(st.integers(0, 2)) > 0
    if mutated:
        tokens = draw(_mutate_tokens(tokens))
    if mutated and tokens and draw(st.integers(0, 9)) == 9:            # 1 KB .. 100 KB
        i = draw(st.integers(0, len(tokens) - 1))
        tokens[i] = _blow_up(tokens[i], draw(st.sampled_from([1_000, 10_000, 100_000])))
    case = draw(KEYWORD_CASE)
    text = ""
    for token in tokens:
        word = case(token) if token.upper() in KEYWORDS else token
        text += word + draw(SEPARATOR)
    return draw(_mutate_text(text)) if mutated else text


# -- round two (issue 32): a seeded generator of hostile statements -------------------------------
#
# Plain ``random.Random`` rather than hypothesis: case ``k`` of seed ``s`` is
# ``hostile_query(s, k)`` on any machine, so a failure of the long run is replayed alone.
# Where round one draws from the grammar and mutates a little, this one aims at what
# round one missed: every numeric slot at its extremes (denormals, 1e308, 2**31 - 1 and
# neighbours, 4,300 digits, signs, hex, underscores, nan/inf words), WHERE on text columns,
# every clause in any order (and repeated), unicode look-alikes and invisible characters,
# deep nesting, huge literals and many statements, globs from the disk's root.

import random

EXTREME_NUMBERS = [
    "0", "00", "0.0", ".0", "0.", "0e0", "0E+99", "1e-300", "1e-320", "4.9e-324", "2.225e-308",
    "2.2250738585072014e-308", "1e308", "1.7976931348623157e308", "1.8e308", "1e309",
    "2147483646", "2147483647", "2147483648", "4294967296", "9223372036854775807",
    "9223372036854775808", "1" + "0" * 4299, "1" + "0" * 4300, "0" * 10_000 + "1",
    "1e+0000000000000000000000001", "1e-99999999999999999999", "123456789.123456789e-10",
    "0.9999999999999999999", "1.0000000000000002", "-0", "-0.0", "-1", "+1", "1_000", "0x10",
    "1e", "1e+", ".", "..5", "1..2", "nan", "inf", "NaN", "Infinity", "-inf", "1/2", "½",
]
PLAIN_WHOLE = ["1", "2", "3", "4", "5", "8", "16", "32"]           # PATCH, STRIDE, BATCH, ...
PLAIN_REAL = ["0.5", "0.25", "0.9", "0.99", "0.1", "1", "2", "3"]   # SSIM, DRILLDOWN, COLOR, ...
# Look-alikes and invisibles: a keyword or digit that is not one, spaces that are not spaces.
UNICODE_BITS = ["\u00a0", "\u2007", "\u3000", "\u200b", "\u200d", "\u2060", "\ufeff", "\u202e",
                "\u2066", "\u0301", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x00", "\ud800",
                "\udfff", "\ue000", "\uffff", "\U0010ffff", "\U0001F431", "ｓ", "１６", "١٦", "²",
                "𝟏𝟔", "Ⅻ", "ſ", "ǅ", "İ", "ﬁ", "\u212a"]
LOOKALIKES = {"O": "Ο", "C": "С", "E": "Е", "A": "А", "P": "Р", "T": "Т", "X": "Х", "H": "Н",
              "x": "х", "e": "е", "a": "а", "o": "о", "p": "р", "c": "с", "i": "і", "s": "ѕ"}
COLUMNS = ["probability", "drop", "seconds", "target", "path", "label", "height", "width",
           "ssim", "nope", "PATH", "Drop"]
GLOBS = ["'shots/*.png'", "'shots/**/*.png'", "'**/*.png'", "'/**/*.png'", "'/*/**'",
         "'/tmp/../**/*.png'", "'//**'", "'shots/[!s]*'", "'shots/*.nope'", "'shots/**'",
         "'./shots/./*.png'", "'shots/*/../*.png'", "'shots/[a-'", "'*'", "'*/'", "'**'"]
SETTING_NAMES = ["memory_limit", "confirm_seconds", "crossover", "tau", "max_image_pixels",
                 "strategy", "gates", "layout", "engine", "overlay_alpha", "overlay_scale", "batch"]


class _Hostile:
    """The tokens of one case, drawn from one ``random.Random``."""

    def __init__(self, rng: random.Random):
        self.r = rng
        # Half the cases are a storm (extreme numbers anywhere, odd spaces, mutations); the
        # other half are well-formed but for one extreme number, so the checks behind the
        # parser are reached: planning, ranking, drill-down, writing.
        self.storm = rng.random() < 0.5
        self.extreme = rng.choice([0.05, 0.2, 0.5]) if self.storm else 0.0
        self.odd_spaces = self.storm and rng.random() < 0.2
        self.numbers_drawn, self.fault_at = 0, rng.randrange(4)

    def pick(self, items):
        return items[self.r.randrange(len(items))]

    def number(self, real: bool = False) -> str:
        """A number for a slot of whole numbers (or of ``real`` ones), now and then extreme."""
        self.numbers_drawn += 1
        if self.numbers_drawn == self.fault_at + 1 and not self.storm:
            return self.pick(EXTREME_NUMBERS)
        if self.r.random() < self.extreme:
            return self.pick(EXTREME_NUMBERS)
        return self.pick(PLAIN_REAL if real else PLAIN_WHOLE)

    def real(self) -> str:
        return self.number(real=True)

    def text(self) -> str:
        bits = [self.pick(UNICODE_BITS) if self.r.random() < 0.3 else self.pick(list("ab.*/_ -'é猫"))
                for _ in range(self.r.randrange(0, 12))]
        return "'" + "".join(bits).replace("'", "''") + "'"

    def numbers(self, count: int, real: bool = False) -> list:
        depth = self.r.choice([1] * 12 + [2, 5, 50])        # deep nesting: ((((1, 2, 3))))
        inner = sum(([self.number(real), ","] for _ in range(count)), [])[:-1]
        return ["("] * depth + inner + [")"] * depth

    def image(self) -> list:
        return self.pick([["img"]] * 4 + [["vol"], ["vol"], ["tbl"], [self.pick(GLOBS)], [self.pick(GLOBS)],
                          ["'shots/shot0.png'"], ["sample", "(", "'chelsea'", ")"],
                          ["sample", "(", self.text(), ")"], [self.text()],
                          ["sample", "(", "sample", "(", "'x'", ")", ")"]])

    def target(self) -> list:
        one = lambda: self.pick([[self.number()], [self.text()], ["PREDICTED"], ["'c'"]])  # noqa: E731
        several = sum((one() + [","] for _ in range(self.r.randrange(1, 6))), [])[:-1]
        return self.pick([one(), ["TOP", self.number()], ["(", *several, ")"]])

    def size(self) -> list:
        extra = self.r.choice([0, 0, 0, 1, 1, 2])          # a square, h x w, or a volume's d x h x w
        return [self.number()] + sum((["x", self.number()] for _ in range(extra)), [])

    def where(self) -> list:
        texts = [self.text(), "'c'", "'shots/shot1.png'"]
        value = self.real() if self.r.random() < 0.5 else self.pick(texts)
        return ["WHERE", self.pick(COLUMNS), self.pick([">", ">=", "<", "<="] * 3 + ["=", "!="]), value]

    def clauses(self) -> list:
        every = [lambda: ["TARGET", *self.target()], lambda: ["PATCH", *self.size()],
                 lambda: ["STRIDE", *self.size()],
                 lambda: ["COLOR", *self.pick([["gray"], ["mean"], self.numbers(3, real=True),
                                               self.numbers(4, real=True), self.numbers(1, real=True),
                                               ["(", "-", self.number(real=True), ")"]])],
                 lambda: ["REGION", *self.numbers(self.pick([4, 4, 3, 6, 6]))],
                 lambda: ["WITH", "SSIM", ">=", self.real()],
                 lambda: ["DRILLDOWN", self.pick([self.real()] * 4 + ["1e-300", "1e-30", "0.999999"])]
                 + (["SPEEDUP", self.real()] if self.r.random() < 0.5 else []),
                 lambda: ["ON", self.pick(["CPU", "GPU", "AUTO", "RAY"])],
                 lambda: ["BATCH", self.number()],
                 lambda: ["INTO", self.pick(["'o.png'", "'o.npy'", "'o.parquet'", "'/proc/o.png'",
                                             self.text()])],
                 lambda: ["RESIZE", self.pick(["squash", "crop", "pad"])],
                 lambda: ["OUTPUT", self.pick(["softmax", "sigmoid", "logits", "probability"])],
                 self.where,
                 lambda: ["ORDER", "BY", self.pick(COLUMNS)] + self.pick([[], ["ASC"], ["DESC"]]),
                 lambda: ["LIMIT", self.number()]]
        count = self.r.choice([0, 1, 2, 3, 4, 6, len(every)])
        chosen = self.r.sample(every, count)                                  # any order
        if chosen and self.r.random() < 0.1:
            chosen.append(self.pick(chosen))                                  # a repeated clause
        return sum((make() for make in chosen), [])

    def statement(self) -> list:
        occlude = ["OCCLUDE", *self.image(), "USING", self.pick(["net", "net", "net3", "nope", "ts"]),
                   *self.clauses()]
        return self.pick([
            occlude, occlude, occlude, ["EXPLAIN"] + occlude, ["EXPLAIN", "ANALYZE"] + occlude,
            ["SET", self.pick(SETTING_NAMES), "=", self.pick([self.real(), self.text(),
                                                               f"'{self.real()} gb'", "auto"])],
            ["LOAD", "MODEL", self.pick(["m1", "ts"]), "FROM",
             self.pick(["'ts.pt'", "'missing.pt'", "'shots/shot0.png'", "'evil.pt'", self.text()])]
            + self.pick([[], ["ARCH", "torchscript"], ["ARCH", "resnet18"]])
            + self.pick([[], ["LABELS", self.text()]]) + self.pick([[], ["TRUSTED"], ["TRUSTED"]]),
            ["LOAD", "IMAGES", "t2", "FROM", self.pick(GLOBS)],
            ["LOAD", "IMAGE", "i2", "FROM", self.pick(["'shots/shot1.png'", self.text()])],
            ["CALIBRATE", "net", "ON", self.pick(GLOBS + ["(img, img)"]), "PATCH", self.number()],
            ["SHOW", self.pick(["MODELS", "IMAGES", "SETTINGS"])],
        ])

    def mutate(self, tokens: list) -> list:
        for _ in range(self.r.choice([0, 1, 1, 2, 3])):
            if not tokens:
                break
            i = self.r.randrange(len(tokens))
            kind = self.pick(["swap", "drop", "double", "lookalike", "case", "glue", "number"])
            if kind == "swap":
                j = self.r.randrange(len(tokens))
                tokens[i], tokens[j] = tokens[j], tokens[i]
            elif kind == "drop":
                del tokens[i]
            elif kind == "double":
                tokens.insert(i, tokens[i])
            elif kind == "lookalike":
                tokens[i] = "".join(LOOKALIKES.get(ch, ch) if self.r.random() < 0.5 else ch
                                    for ch in tokens[i])
            elif kind == "case":
                tokens[i] = "".join(ch.swapcase() if self.r.random() < 0.5 else ch for ch in tokens[i])
            elif kind == "glue" and i + 1 < len(tokens):
                tokens[i:i + 2] = [tokens[i] + tokens[i + 1]]
            else:
                tokens[i] = self.number()
        return tokens

    def spacing(self) -> str:
        if self.odd_spaces and self.r.random() < 0.2:
            return self.pick(UNICODE_BITS[:9])
        return self.pick([" "] * 20 + ["\n", "\t", " -- c\n", "\r\n", "  "])

    def huge(self, tokens: list) -> list:
        """One literal, list or statement run blown up (10 KB .. 200 KB of text)."""
        n = self.pick([1_000, 10_000, 50_000])
        return self.pick([
            tokens + ["COLOR", "("] + ["1", ","] * n + ["1", ")"],
            tokens + ["TARGET", "("] + ["PREDICTED", ","] * (n // 10) + ["0", ")"],
            ["(" * n] + tokens, tokens + [";"] * n, tokens + ["INTO", "'" + "p" * n + ".png'"],
            ["SHOW", "MODELS", ";"] * (n // 100) + tokens,
            tokens + ["PATCH", "9" * n], tokens + ["WHERE", "label", ">", "'" + "é" * n + "'"],
        ])


def hostile_query(seed: int, k: int) -> str:
    """Case ``k`` of seed ``seed``: one to three statements, mutated, sometimes huge."""
    h = _Hostile(random.Random(f"kql-fuzz-2:{seed}:{k}"))
    tokens = sum((h.statement() + [";"] for _ in range(h.pick([1, 1, 1, 2, 3]))), [])[:-1]
    if not h.storm:
        return " ".join(tokens)
    tokens = h.mutate(tokens)
    if h.r.random() < 0.06:
        tokens = h.huge(tokens)
    text = "".join(token + h.spacing() for token in tokens)
    if h.r.random() < 0.15:                                  # a character anywhere
        at = h.r.randrange(len(text) + 1)
        text = text[:at] + h.pick(UNICODE_BITS) + text[at:]
    if h.r.random() < 0.1:
        text = text[:h.r.randrange(len(text) + 1)]           # cut anywhere
    return text
