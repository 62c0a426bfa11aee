"""MMMU-style parsing of a generated answer into an option letter.

``parse_choice`` tries, in order, and returns the first hit:

1. the whole response is one letter, optionally wrapped/punctuated: "B", "(B)", "B.", "B)", "B:",
   "[B]", "**B**" (a lone lowercase letter counts too, since it cannot be an article there); or it
   opens with a letter and that option's own text, as the prompt's choice lines read: "B. blue ...", "b) blue";
2. an explicit answer phrase: "Answer: B", "the answer is (B)", "Option B", "choice: B" (lowercase too:
   "answer: b");
3. a parenthesised letter "(B)" anywhere, or "(b)";
4. a letter followed by "." / ")" / ":" at a token start: "B. blue", "B) blue";
5. a bare standalone uppercase letter token ("B is correct");
6. the option text itself ("blue"), case-insensitive on word boundaries (a combining mark, such as a
   Devanagari vowel sign, is part of its word); the longest matching option wins, ties go to the earliest
   position.

In tiers 2–5 a letter inside a repetition of some option's own text does not count: "Vitamin C" answering
option B "Vitamin C" (of "Vitamin D", "Vitamin C", …) is B by tier 6, not C; likewise "Both A and B", "Graph A".

In tiers 2–5 a letter the response rejects is passed over: one right after "not", "n't", "never" or "cannot (be)"
("Not A, it's C", "it isn't (A); C", "not A or B but C", with a list of letters after the negation), or one
followed by "is/are not correct/right/the answer" ("Options A and B are not correct; C"), but not by "is wrong",
"incorrect" or "false", which to a question such as "Which statement is false?" names the answer. Only while
something else is given: with no other letter and no option text the rejected letter is read as before ("Not A"
is A), so a response naming one letter never turns into no answer.

Within a tier the FIRST occurrence wins. MMMU's reference parser takes the last candidate, which
suits long chain-of-thought answers; our generations are a few greedy tokens, where the first
letter is the answer and later text is the model rambling on ("B. Blue is not C"). Longer ones
(``--max-new-tokens``) ramble further: SmolLM2 writes "A. Liver\n\nThe answer is D. Stomach.", whose
opening line, the letter with its own option, is the answer its first token chose.

Elsewhere only uppercase letters within the options' range count, because lowercase "a" and "i" are words.
For the same reason an "A" or "I" followed by a lowercase word ("A red circle", "I think") or an
apostrophe ("I'm") is read as an article/pronoun, not as a choice, except before "is", "because", "since",
"as", "and", "or" ("A is correct", "the answer is A because ..."); this holds after an answer phrase
too ("Answer: I think it is C" is C). A capital that is one letter of a longer word spelled with accented letters
("Día", Vietnamese "Bởi", decomposed "Ábaco") is that word too; scripts without case write a choice right against
their words ("答案是B"), which stays a choice.
Text after a special token such as ``<|im_end|>`` or ``</s>`` is ignored; full-width letters and punctuation
("（Ｂ）", "答案：Ｃ") read as their ASCII forms.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

# Cut at the first special token: chat-template markers like <|im_end|>, <|eot_id|>, and </s>, <eos>, <end_of_turn>.
_SPECIAL = re.compile(r"<\|[^|>]{0,40}\|>|</s>|<eos>|<end_of_turn>|<\|endoftext\|>")
_WRAP = "()[]{}*`'\"_ \t\n"  # wrapping characters stripped around a lone letter


# Full-width ASCII (U+FF01-FF5E: "Ｃ", "（Ｂ）", "：") and the ideographic space, as Chinese/Japanese text writes them,
# mapped to ASCII in responses and options alike, so their letters and brackets read as such.
_HALFWIDTH = {0xFF01 + i: 0x21 + i for i in range(0x5E)} | {0x3000: 0x20}


def option_letters(n: int) -> tuple[str, ...]:
    """'A', 'B', ... for n options (MMMU has items with more than four)."""
    if n > 26:
        raise ValueError(f"at most 26 options supported, got {n}")
    return tuple(chr(ord("A") + i) for i in range(n))


def strip_special(response: str) -> str:
    """The response up to the first special token, whitespace-stripped."""
    m = _SPECIAL.search(response)
    return (response[: m.start()] if m else response).strip()


def _lone_letter(text: str, letters: str) -> str | None:
    core = text.strip(_WRAP).rstrip(".:)").strip(_WRAP).upper()
    if len(core) == 1 and core in letters:  # upper() first: "ﬅ" is one character but "ST", a run of the letters
        return core
    return None


def _opening_choice(text: str, options: Sequence[str], letters: str) -> str | None:
    """The letter a response opens with when its own option's text follows it: "A. Liver", "(C) 56"."""
    m = re.match(r"[(\[*]{0,2}(?P<L>[A-Za-z])[.):\]*]{1,3}\s*", text)  # "b) blue" as well
    letter = m.group("L").upper() if m else ""
    if not letter or letter not in letters:
        return None
    opt = options[letters.index(letter)].strip()
    return letter if opt and _find_word(opt, text[m.end():]) == 0 else None


Spans = list[tuple[int, int]]


def _inside(spans: Spans, m: re.Match[str]) -> bool:
    return any(a <= m.start("L") < b for a, b in spans)


_LISTED = r"[(\[*]*[A-Z][)\].*]*"  # one letter as a list of them writes it: "A", "(A)", "**A**"
# a negation right before the letter, maybe through a list of letters it also rejects: "not A or (B), C"
_NEGATED_BEFORE = re.compile(r"(?i:\bnot|n't|\bnever|\bcannot)(?i:\s+be)?\s+(?i:(?:option|choice|answer)s?\s+)?"
                             rf"(?:{_LISTED}\s*(?:,|(?i:or|and|nor))\s*)*[(\[*]*$")
# a rejection after it, maybe through such a list: "A and B are not correct", "(A) is not the answer". Not "A is
# wrong / incorrect / false": to "Which statement is false?" that names the answer
_NEGATED_AFTER = re.compile(rf"[)\].*]*(?:\s*(?:,|(?i:or|and|&))\s*{_LISTED})*\s+(?i:is|are)\s+"
                            r"(?i:not\s+(?:correct|right|the\s+answer))\b")


def _rejected(text: str, m: re.Match[str]) -> bool:
    """The response rejects this letter: "not A", "isn't (A)", "A and B are not correct", "A is not the answer"."""
    return bool(_NEGATED_BEFORE.search(text[:m.start("L")]) or _NEGATED_AFTER.match(text, m.end("L")))


def _first(pattern: str, text: str, letters: str, echoes: Spans, flags: int = 0, words: bool = False,
           rejects: bool = False) -> str | None:
    """The first match's letter (uppercased) in range that is not part of an echoed option text (``_echo_spans``);
    with ``words``, not one that is an English "A"/"I" (``_is_word``); with ``rejects``, not one the response
    rejects (``_rejected``). A lowercase letter glued to the word before it is that word's end ("options",
    "answers"), not a choice, nor is an "a"/"i" ending the text (a generation cut off after "The correct answer
    is a")."""
    for m in re.finditer(pattern, text, flags):
        letter, at = m.group("L"), m.start("L")
        if letter.islower() and (at and text[at - 1].isalpha() or letter in "ai" and not text[at + 1:].strip()):
            continue
        if (letter.upper() in letters and not _inside(echoes, m) and not _glued(text, at)
                and not (words and _is_word(text, m)) and not (rejects and _rejected(text, m))):
            return letter.upper()
    return None


_CHOICE_FOLLOWERS = {"is", "because", "since", "as", "and", "or"}  # "A is correct", "A because ..."


def _cased(ch: str) -> bool:
    """A letter of a cased script beyond ASCII ("í", "ở", "É"): ASCII neighbours are the patterns' own business."""
    return not ch.isascii() and unicodedata.category(ch) in ("Lu", "Ll", "Lt")


def _glued(text: str, at: int) -> bool:
    """The letter at ``at`` is one letter of a longer word in a cased script: a cased letter or a combining mark right
    after it, or right before it a cased letter beyond ASCII or any cased letter carrying combining marks: the D of
    Spanish "Día", the B of Vietnamese "Bởi" (because), the C of "PRÉCÉDENT", decomposed "Ábaco" and "ÓD" (the
    patterns' ASCII look-arounds took these for choices). Scripts without case write a choice straight against their
    words ("答案是B"): still one."""
    after = text[at + 1:at + 2]
    if after and (_cased(after) or unicodedata.category(after).startswith("M")):
        return True
    i = at - 1
    while i >= 0 and unicodedata.category(text[i]).startswith("M"):
        i -= 1
    # behind marks, any cased letter carries them: decomposed (NFD) "É" is an ASCII E and a combining acute
    return i >= 0 and (_cased(text[i]) or i < at - 1 and unicodedata.category(text[i]) in ("Lu", "Ll", "Lt"))


def _is_word(text: str, m: re.Match[str]) -> bool:
    """An "A"/"I" starting an English phrase ("A red circle", "I think", "I'm"), not a choice."""
    if m.group("L").upper() not in "AI":
        return False
    if text[m.end():m.end() + 1] in ("'", "’"):
        return True
    nxt = re.match(r"\s+(\w+)", text[m.end():])  # a lowercase word, "água" as well as "red"
    return bool(nxt) and nxt.group(1)[0].islower() and nxt.group(1) not in _CHOICE_FOLLOWERS


def _bare_letter(text: str, letters: str, echoes: Spans, rejects: bool) -> str | None:
    return _first(r"(?<![A-Za-z0-9])(?P<L>[A-Z])(?![A-Za-z0-9'])", text, letters, echoes, words=True,
                  rejects=rejects)


def _letter_tiers(text: str, letters: str, echoes: Spans, rejects: bool) -> str | None:
    """Tiers 2–5: an answer phrase, "(B)", "B." / "B)", a bare "B"."""
    return (
        _first(r"(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*[(\[*]*(?P<L>[A-Z])(?![A-Za-z0-9])",
               text, letters, echoes, re.IGNORECASE, words=True, rejects=rejects)
        or _first(r"\((?P<L>[A-Za-z])\)", text, letters, echoes, rejects=rejects)
        or _first(r"(?<![A-Za-z0-9])(?P<L>[A-Z])[.):](?![A-Za-z0-9])", text, letters, echoes, rejects=rejects)
        or _bare_letter(text, letters, echoes, rejects)
    )


def _in_word(ch: str) -> bool:
    """Part of a word: a letter, digit or "_" (regex ``\\w``), or a combining mark, which ``\\w`` leaves out
    although Devanagari/Bengali vowel signs and Arabic or Yoruba diacritics sit inside words ("रोम|ानिया")."""
    return ch.isalnum() or ch == "_" or unicodedata.category(ch).startswith("M")


def _word_spans(opt: str, text: str) -> Spans:
    """Every occurrence of ``opt`` in ``text`` (case-insensitive) that is a whole word or phrase: no word
    character, combining marks included, right before or after it."""
    spans = []
    for m in re.finditer("(?=" + re.escape(opt) + ")", text, re.IGNORECASE):
        a, b = m.start(), m.start() + len(opt)
        if (a == 0 or not _in_word(text[a - 1])) and (b == len(text) or not _in_word(text[b])):
            spans.append((a, b))
    return spans


def _find_word(opt: str, text: str) -> int | None:
    """Position of the first whole-word occurrence of ``opt`` in ``text`` (``_word_spans``), or None."""
    spans = _word_spans(opt, text)
    return spans[0][0] if spans else None


def _echo_spans(text: str, options: Sequence[str], letters: str) -> Spans:
    """Where ``text`` repeats an option's own text ("Vitamin C", "Both A and B"): a letter there belongs to that
    text, not to a choice. Options that are themselves a lone letter ("B") mark nothing, or no letter could count."""
    return [span for opt in options if opt.strip() and not _lone_letter(opt, letters)
            for span in _word_spans(opt.strip(), text)]


def _option_text(text: str, options: Sequence[str]) -> str | None:
    best: tuple[int, int, int] | None = None  # (-len, position, index)
    for i, opt in enumerate(options):
        opt = opt.strip()
        if not opt:
            continue
        pos = _find_word(opt, text)
        if pos is not None:
            key = (-len(opt), pos, i)
            best = key if best is None or key < best else best
    return chr(ord("A") + best[2]) if best else None


def parse_choice(response: str, options: Sequence[str]) -> str | None:
    """The option letter chosen in ``response`` ('A', 'B', ...), or None if none can be read."""
    # the first 26 of more options (the parser never refused them); a string, as the tiers' `in` tests were written
    letters = "".join(option_letters(min(len(options), 26)))
    if not letters:
        return None
    text = strip_special(response).translate(_HALFWIDTH)
    options = [o.translate(_HALFWIDTH) for o in options]
    if not text:
        return None
    if lone := _lone_letter(text, letters) or _opening_choice(text, options, letters):
        return lone
    echoes = _echo_spans(text, options, letters)
    return (
        _letter_tiers(text, letters, echoes, rejects=True)
        or _option_text(text, options)
        or _letter_tiers(text, letters, echoes, rejects=False)  # only rejected letters: read as before ("Not A")
    )
