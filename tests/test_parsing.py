import string

import pytest

from probe.parsing import parse_choice, strip_special

OPTS4 = ["red", "blue", "green", "yellow"]
OPTS6 = ["1", "2", "3", "4", "5", "6"]


@pytest.mark.parametrize(
    "response, expected",
    [
        # lone letters, wrapped or punctuated
        ("B", "B"),
        ("  B  ", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B:", "B"),
        ("[C]", "C"),
        ("**D**", "D"),
        ("b", "B"),  # a lone lowercase letter cannot be an article
        ("(b)", "B"),
        ("\nA\n", "A"),
        # explicit answer phrases
        ("Answer: B", "B"),
        ("answer: (C)", "C"),
        ("The answer is D.", "D"),
        ("The correct option is B", "B"),
        ("I think the answer is C", "C"),  # the pronoun "I" is not choice I (and out of range anyway)
        # letter with punctuation followed by text
        ("B. blue", "B"),
        ("C) green", "C"),
        ("(A) red", "A"),
        # first standalone letter wins (short greedy generations)
        ("B. Blue, not C", "B"),
        ("B is correct, C is not", "B"),
        ("A is correct", "A"),
        # special tokens end the response
        ("C<|im_end|>A", "C"),
        ("<|im_start|>", None),
        ("D</s>", "D"),
        ("C<|eot_id|>", "C"),
        # option text
        ("blue", "B"),
        ("It is Yellow.", "D"),
        ("A red circle", "A"),  # article "A" ignored, option text "red" gives A
        ("A green one", "C"),
        # nothing parseable
        ("", None),
        ("   ", None),
        ("I don't know", None),
        ("a", "A"),  # lone letter, in range
        ("purple", None),
        ("redish", None),  # option text only on word boundaries
    ],
)
def test_parse_choice_four_options(response, expected):
    assert parse_choice(response, OPTS4) == expected


# SmolLM2-135M-Instruct's greedy answers (24 new tokens) to MMLU-Pro / MMMLU items: the opening "X. <option X>" is
# what its first token chose; the "The answer is Y" after it is rambling (its Y even names another option's text).
SMOLLM2_RAMBLES = [
    ("A. Liver\n\nThe answer is D. Stomach.",
     ["Liver", "Lung", "Kidney", "Stomach", "Brain", "Skin", "Heart", "Spleen", "Bone", "Eye"]),
    ("F. Aristotle\n\nThe answer is D. Hegel.",
     ["Kant", "Descartes", "Hume", "Locke", "Plato", "Aristotle", "Nietzsche", "Spinoza", "Hegel", "Marx"]),
    ("A. A gift\n\nThe answer is D. A seal.",
     ["A gift", "Something of value exchanged", "A written form", "A signature", "A witness", "A notary", "A seal",
      "A deadline", "An offer"]),
    ("C. मैड्रिड\n\nThe answer is D. मै", ["बर्लिन", "पेरिस", "मैड्रिड", "रोम"]),
    ("B. 巴黎\n\nThe answer is D. 罗马.", ["柏林", "巴黎", "马德里", "罗马"]),
]


@pytest.mark.parametrize("response, options", SMOLLM2_RAMBLES)
def test_an_opening_letter_with_its_own_option_beats_a_later_answer_phrase(response, options):
    first_line = response.split("\n")[0]
    assert parse_choice(response, options) == "ABCDEFGHIJ"[options.index(first_line[3:])]


def test_an_opening_letter_without_its_option_text_is_no_stronger_than_before():
    assert parse_choice("C. ثمانية\n\nThe answer is D. ثمانية.", ["خمسة", "ستة", "سبعة", "ثمانية"]) == "D"
    assert parse_choice("C. no, (B)", OPTS4) == "B"


def test_letters_out_of_range_ignored():
    assert parse_choice("E", OPTS4) is None
    assert parse_choice("E. or B", OPTS4) == "B"
    assert parse_choice("(F)", OPTS4) is None


def test_letters_beyond_d():
    assert parse_choice("E", OPTS6) == "E"
    assert parse_choice("(F)", OPTS6) == "F"
    assert parse_choice("Answer: E", OPTS6) == "E"


def test_option_text_longest_wins():
    opts = ["blue", "light blue", "red"]
    assert parse_choice("light blue", opts) == "B"
    assert parse_choice("It's blue", opts) == "A"


def test_option_text_with_symbols():
    opts = ["$6", "$7", "$8"]
    assert parse_choice("$7", opts) == "B"
    assert parse_choice("The cost is $8 total", opts) == "C"


def test_option_text_is_a_whole_word_in_scripts_with_combining_marks():
    """Regex ``\\w`` leaves out combining marks, so "रोम" (Rome) was found inside "रोमानिया" (Romania), whose
    next character is the vowel sign "ा", and a Hindi answer naming no option was read as option A."""
    opts = ["रोम", "पेरिस", "बर्लिन", "मैड्रिड"]  # MMMLU HI_IN: Rome, Paris, Berlin, Madrid
    assert parse_choice("रोमानिया", opts) is None
    assert parse_choice("उत्तर रोम है", opts) == "A"  # "the answer is Rome": a word of its own still counts
    assert parse_choice("यह पेरिस है।", opts) == "B"
    assert parse_choice("मैड्रिड", opts) == "D"


def test_numeric_options_match_text():
    assert parse_choice("3", OPTS6) == "C"
    assert parse_choice("There are 5 shapes", OPTS6) == "E"


def test_image_options():
    opts = ["<image 1>", "<image 2>"]
    assert parse_choice("<image 2>", opts) == "B"
    assert parse_choice("B", opts) == "B"


def test_pronoun_i_with_many_options():
    opts = [str(i) for i in range(10)]  # letters A..J, so "I" is in range
    assert parse_choice("I think it is J", opts) == "J"
    assert parse_choice("I", opts) == "I"
    assert parse_choice("I.", opts) == "I"


def test_no_options():
    assert parse_choice("A", []) is None


def test_strip_special():
    assert strip_special("  B <|im_end|> trailing") == "B"
    assert strip_special("no tokens ") == "no tokens"


@pytest.mark.parametrize("response, expected", [
    ("Answer: I think it is C", "C"),  # the pronoun after an answer phrase was read as choice I
    ("The answer is I think C", "C"),
    ("The answer: A lot of people say C", "C"),  # the article likewise as choice A
    ("Answer: I'm sure it is C", "C"),
    ("I\u2019m sure: C", "C"),  # a typographic apostrophe is an apostrophe too
    ("The answer is A because it is red", "A"),  # a letter followed by a connective is still the choice
    ("The answer is I since 8 is even", "I"),
    ("Answer: I", "I"),
    ("The answer is I.", "I"),
])
def test_an_english_a_or_i_after_an_answer_phrase_is_no_choice(response, expected):
    assert parse_choice(response, [str(i) for i in range(10)]) == expected  # letters A..J: "A" and "I" in range


@pytest.mark.parametrize("response, options", [
    ("Graph A", ["Graph B", "Graph A", "Graph D", "Graph C"]),  # figure labels as option texts, in another order
    ("Vitamin C", ["Vitamin D", "Vitamin C", "Vitamin B12", "Vitamin A"]),
    ("It is Vitamin A.", ["Vitamin D", "Vitamin C", "Vitamin B12", "Vitamin A"]),
    ("Both A and B", ["A only", "B only", "Both A and B", "Neither A nor B"]),
    ("Neither A nor B", ["A only", "B only", "Both A and B", "Neither A nor B"]),
    ("$A+B$", ["$A$", "$B$", "$A+B$", "$AB$"]),
    ("Answer: B only", ["A only", "B only", "Both A and B", "Neither A nor B"][::-1]),
])
def test_a_letter_inside_an_echoed_options_text_is_not_a_choice(response, options):
    """A response that repeats an option's text ("Vitamin C", option B) was read by the letter inside it (C): a
    letter within an occurrence of some option's own text is that text, not a choice. Oracle: the option whose
    text the response holds."""
    echoed = max((o for o in options if o.lower() in response.lower()), key=len)
    assert parse_choice(response, options) == "ABCD"[options.index(echoed)]


def test_an_explicit_letter_still_beats_an_echoed_option_text():
    graphs = ["Graph B", "Graph A", "Graph D", "Graph C"]
    assert parse_choice("B. Graph A", graphs) == "B"  # opening letter with its own text
    assert parse_choice("C: Graph A", graphs) == "C"  # a letter outside the echo keeps its tier
    assert parse_choice("The answer is D, Graph C", graphs) == "D"
    assert parse_choice("A", ["A only", "B only", "Both A and B", "Neither A nor B"]) == "A"
    assert parse_choice("B", ["C", "B", "A", "D"]) == "B"  # options that are bare letters mask nothing


@pytest.mark.parametrize("response, expected", [
    ("The answer is (b), not A", "B"),  # was A: the lowercase choice was passed over for a later bare letter
    ("answer: b, since A is wrong", "B"),
    ("Answer: c", "C"),
    ("the answer is d.", "D"),
    ("(c) and not A", "C"),
    ("The answer is a.", "A"),
    ("The correct answer is a", None),  # cut off before the noun the article opens
    ("The answer is c", "C"),
    ("The answer is a red one", "A"),  # the article: no choice after the phrase, option text "red" reads A
    ("The answer is a green one", "C"),
    ("The options are unclear", None),  # "options": the s of the phrase's plural is no choice
    ("Answers vary", None),
])
def test_a_lowercase_letter_after_an_answer_phrase_or_in_parentheses_is_the_choice(response, expected):
    """Only uppercase letters counted outside a lone-letter response, so 'The answer is (b), not A' read A, the
    letter it rejects; a lowercase letter in parentheses or right after an answer phrase is unambiguous."""
    assert parse_choice(response, OPTS4) == expected


def test_lowercase_answer_phrase_letters_keep_the_article_and_pronoun_rule():
    many = [str(i) for i in range(20)]  # letters A..T: "s" of "options" and "i" of "i think" in range
    assert parse_choice("the options are 3", many) == "D"
    assert parse_choice("answer: i think 4", many) == "E"
    assert parse_choice("answer: i.", many) == "I"
    assert parse_choice("answer: i", many) is None  # "i" ending a cut-off generation could be anything


def test_a_lowercase_opening_letter_with_its_own_option_text_is_the_choice():
    assert parse_choice("b) blue A", OPTS4) == "B"  # was A, the bare letter after it
    assert parse_choice("c. green, not A", OPTS4) == "C"
    assert parse_choice("a. blue", OPTS4) == "B"  # a lowercase letter without its own text proves nothing


@pytest.mark.parametrize("response, expected", [
    ("Ｃ", "C"), ("（Ｂ）", "B"), ("Ｂ．", "B"), ("答案：Ｃ", "C"),
    ("答案是Ｃ，不是A", "C"),  # was A: the full-width choice was invisible, the rejected ASCII letter counted
])
def test_full_width_letters_are_letters(response, expected):
    """Chinese and Japanese text writes Latin letters and brackets full-width (U+FF01-FF5E); the parser saw no
    letter in them. Oracle: the same response with those characters mapped to ASCII by NFKC."""
    import unicodedata

    assert parse_choice(response, OPTS4) == expected == parse_choice(unicodedata.normalize("NFKC", response), OPTS4)


def test_full_width_option_text_matches_either_width():
    assert parse_choice("3", ["１", "２", "３", "４"]) == "C"
    assert parse_choice("３", ["1", "2", "3", "4"]) == "C"


@pytest.mark.parametrize("response, kept", [
    ("Not A, it's C", "it's C"),  # was A: the first letter, the one it rejects
    ("Options A and B are not correct; C", "C"),  # was A
    ("not A or B, but C", "but C"),  # the negation covers the list of letters after it
    ("It isn't (A); C", "C"),
    ("cannot be A, so B", "so B"),
    ("The answer is not (A) but D", "D"),
    ("Option A is not right, option C is", "option C is"),
    ("A is not the answer; B is", "B is"),
    ("A is not correct. B", "B"),
    ("Not A, it's blue", "blue"),  # no other letter: the option text the response does give
])
def test_a_letter_the_response_rejects_is_not_its_choice(response, kept):
    """'Not A, it's C' read A (first letter wins). Oracle: the response with the rejecting clause cut out, which
    the parser reads without any negation rule."""
    assert parse_choice(response, OPTS4) == parse_choice(kept, OPTS4) is not None


@pytest.mark.parametrize("response, expected", [
    ("Not A", "A"),  # nothing else given: read as before, never None
    ("I'm not sure but A", "A"),  # "not" negates "sure", not the letter
    ("I don't know, A", "A"),
    ("not sure, B", "B"),
    ("Which is wrong? A", "A"),  # "wrong" before the letter is no rejection ("the incorrect one is A")
    ("C is not a color", "C"),  # "is not" + anything else: the letter may be the answer to a NOT question
    ("B is correct, C is not", "B"),
    ("The answer is B, not A", "B"),
    ("A. red, B is wrong", "A"),
    # "wrong/incorrect/false" after a letter: to "Which statement is false?" it names the answer, so it is read
    ("A is false, B is true", "A"),
    ("Options A and B are wrong; C", "A"),
    ("A is incorrect. B", "A"),
])
def test_a_negation_that_rejects_no_letter_changes_nothing(response, expected):
    assert parse_choice(response, OPTS4) == expected


@pytest.mark.parametrize("response", ["ﬅ", "(ﬆ)", "ﬅ."])
def test_a_ligature_whose_capital_is_two_letters_is_no_choice(response):
    # "ﬅ".upper() is "ST": with 20 options that is a run of the option letters, not one of them
    options = [f"option {i}" for i in range(20)]
    assert parse_choice(response, options) is None
    assert parse_choice("S", options) == "S"


def test_option_letters_are_the_alphabet_and_no_more():
    """probe.parsing.option_letters(n): the first n capitals by code point, A to Z at most; a 27th option has no
    letter (chr(ord('A') + 26) is '['), so asking for it is a ValueError, not a bracket."""
    from probe.parsing import option_letters

    assert option_letters(0) == ()
    assert option_letters(4) == ("A", "B", "C", "D")
    assert "".join(option_letters(26)) == string.ascii_uppercase
    with pytest.raises(ValueError, match="at most 26 options supported, got 27"):
        option_letters(27)


@pytest.mark.parametrize("n", [26, 30])
def test_the_26th_option_is_read_with_26_or_more_options(n):
    """parse_choice takes the first 26 of more options: Z (the 26th) is a choice with 26 options and with 30, Y
    and Z alike; no options at all read nothing."""
    options = [f"option number {i}" for i in range(n)]
    assert parse_choice("Z", options) == "Z" and parse_choice("(Z)", options) == "Z"
    assert parse_choice("The answer is Z.", options) == "Z" and parse_choice("Y", options) == "Y"
    assert parse_choice("A", []) is None and parse_choice("", []) is None


def _folded(text: str) -> str:
    """``text`` with its accents dropped (NFD, combining marks removed): "Día" → "Dia", "Bởi" → "Boi"."""
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


@pytest.mark.parametrize("response, expected", [
    ("Día 3: la respuesta es C", "C"),  # Spanish "day": was D
    ("Bởi vì nó màu xanh, C", "C"),  # Vietnamese "because": was B
    ("Câu trả lời là B", "B"),  # Vietnamese "the answer is B": was C
    ("Dájúdájú C ni", "C"),  # Yoruba "certainly": was D
    ("Décembre ? C", "C"),  # was D
    ("Bär: C", "C"),  # was B
    ("PRÉCÉDENT, B", "B"),  # a capital between accented capitals: was C
    ("A água ferve; C", "C"),  # Portuguese article before a word opening with an accent: was A
    ("A\u0301baco: C", "C"),  # decomposed (NFD) "Ábaco": the capital followed by a combining accent, was A
    ("Answer: Día", None),  # was D
    ("答案是B", "B"), ("选B。", "B"), ("उत्तर की B", "B"),  # scripts without case write the letter against words
])
def test_a_capital_opening_a_word_with_accented_letters_is_no_choice(response, expected):
    """The letter tiers told a letter from a word's first letter by ASCII neighbours only, so the D of Spanish "Día"
    or the B of Vietnamese "Bởi" (because) was read as a choice. Oracle: the same response with its accents
    dropped, whose words are plain ASCII ones the parser already reads as words."""
    assert parse_choice(response, OPTS4) == parse_choice(_folded(response), OPTS4) == expected


@pytest.mark.parametrize("response, expected", [
    ("ÓD: B", "B"),  # an accented capital before the letter: NFD put an ASCII O and a combining acute there, was D
    ("ÉB, C", "C"),  # was B
    ("Día 3: la respuesta es C", "C"), ("Bởi vì nó màu xanh, C", "C"), ("PRÉCÉDENT, B", "B"),
    ("A água ferve; C", "C"), ("Ábaco: C", "C"),
])
def test_decomposed_accents_read_as_the_composed_ones(response, expected):
    """The same words in NFD (a base letter and combining marks: macOS file names, some tokenizers' decoding) and in
    NFC are one response: a capital right after a decomposed accented letter was read as a choice, since the letter
    behind the marks is an ASCII one. Oracle: the composed form, and the accents dropped."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", response)
    assert nfd != response
    assert parse_choice(nfd, OPTS4) == parse_choice(response, OPTS4) == expected
    assert parse_choice(_folded(response), OPTS4) == expected


@pytest.mark.parametrize("response, expected", [
    ("[b].", "B"), ("**b**.", "B"),  # a lone lowercase letter wrapped, then punctuated: one strip left "b]" / "b**"
    ("A or C", "A"),  # "or" follows a choice as "and" does (docstring): read as an article, A passed over for C
    ("Never A; it is C", "C"),  # "never" rejects as "not" does: "never" left out read A
    ("Bǅ C", "C"),  # ǅ is a titlecase letter (Lt), one word with the B: Lu/Ll alone read B
    ("the_red_one", None),  # "_" is a word character (regex \w): "red" inside "the_red_one" is no option text
    ("B<end_of_turn>\nThe answer is C", "B"),  # Gemma's end of turn ends the response
])
def test_the_parsers_documented_word_rules_each_hold(response, expected):
    """Mutants of probe.parsing (mut47) that every other parsing test passed: the second strip of a lone letter's
    wrapping, "or" among the words after which "A" is a choice, "never" among the negations, titlecase letters in
    a cased word, "_" inside a word, and Gemma's <end_of_turn> among the special tokens. Oracle: the rules as the
    module docstring states them and unicodedata's categories."""
    import unicodedata

    assert unicodedata.category("ǅ") == "Lt"
    assert parse_choice(response, OPTS4) == expected


def test_a_full_width_tilde_reads_as_the_ascii_one():
    """The full-width block runs U+FF01-FF5E: its last character, "～", is "~" (a 0x5D range left it out, and an
    option "~10 cm" answered "～10 cm" was no answer). Oracle: unicodedata's NFKC folding of the whole block."""
    import unicodedata

    from probe.parsing import _HALFWIDTH

    assert unicodedata.normalize("NFKC", "～") == "~"
    assert parse_choice("～10 cm", ["~5 cm", "~10 cm"]) == "B"
    block = "".join(chr(c) for c in range(0xFF01, 0xFF5F))
    assert block.translate(_HALFWIDTH) == unicodedata.normalize("NFKC", block)
