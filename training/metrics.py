"""Evaluation metrics with the official definitions: VQA accuracy and COCO caption BLEU-1..4 / CIDEr-D.

Numbers are only comparable with published ones if they are computed the way the benchmarks compute them, so
this module follows the reference code rule for rule instead of using a "close enough" variant:

- VQA: answer normalisation and the leave-one-out "min(#humans / 3, 1)" accuracy of the VQA v2 evaluation script
  (``vqaEval.py`` by Aishwarya Agrawal, GT-Vision-Lab/VQA), rewritten here (the original is a class wired to the
  VQA json files). The one deliberate deviation is documented on :func:`vqa_accuracy`.
- Captions: the scorers themselves come from ``pycocoevalcap`` (``Bleu``, ``Cider``: pure Python). Its tokenizer
  shells out to Stanford CoreNLP 3.4.1's PTBTokenizer (Java), so :func:`ptb_tokenize` reproduces that tokenizer in
  pure Python: evaluation must not depend on a JVM being installed.
"""

from __future__ import annotations

import re
from typing import Hashable, Mapping, Sequence

__all__ = [
    "PTB_PUNCTUATIONS",
    "caption_scores",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "vqa_accuracy",
    "vqa_score",
]

# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy (VQA v2 vqaEval.py)

# A yes/no question that asks about absence ("is there not a circle?", "is no circle present?"): its answers are
# the other way round, so training data and evaluation keep negated questions apart.
# "n't" sits inside a word ("doesn't"), so it cannot start at a word boundary.
NEGATION = re.compile(r"\b(?:not|no|never)\b|n't\b", re.IGNORECASE)

# processPunctuation: these characters are deleted or turned into a space; "." and "'" are not in the list ("."
# has its own rule; "'" must survive for the contractions below).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_VQA_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a typo for a lookbehind and never rejects
# anything, so the rule really is "a period not followed by a digit" (keeps "3.5", strips "dogs.").
_VQA_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE), which passes re.UNICODE (32) as *count*: only the
# first 32 periods are stripped. Kept for exactness; no real answer has more.
_VQA_PERIOD_COUNT = int(re.UNICODE)
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = frozenset(("a", "an", "the"))
# The official contractions map (apostrophe-less spellings -> standard ones), as in the current vqaEval.py, which
# uses ASCII apostrophes throughout. Keys with capitals ("Im", "Ive", "Id've", "I'dve") never match because words
# are lowercased first; they are kept so the table is the official one. "somebody'd" -> "somebodyd" is also theirs.
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def _vqa_process_punctuation(text: str) -> str:
    """processPunctuation. Each listed character is deleted if it touches a space anywhere in the answer (or if
    the answer has a comma between digits anywhere, so "1,000" -> "1000"), else replaced by a space ("black/white"
    -> "black white"). The test looks at the *original* answer for every character, as the official code does."""
    strip_all = _VQA_COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_COUNT)


def _vqa_process_digit_article(text: str) -> str:
    """processDigitArticle: lowercase, number words zero..ten (and "none") to digits, drop a/an/the, then expand
    apostrophe-less contractions ("dont" -> "don't"); words end up separated by single spaces."""
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it: newlines/tabs to spaces, stripped, then
    processPunctuation and processDigitArticle. "Two dogs." -> "2 dogs", "the cat" -> "cat", "dont" -> "don't",
    "1,000" -> "1000", "black/white" -> "black white"."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digit_article(_vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers (0.0 .. 1.0).

    With the usual 10 answers this is the official metric: for each of the 10 ways to leave one human out,
    ``min(#remaining humans who gave the prediction / 3, 1)``; the accuracy is the mean of the 10. So an answer
    given by 4 or more humans scores 1, by 3 humans 0.9 (7 subsets still see 3: 1; 3 subsets see 2: 2/3), by 2
    humans 0.6, by 1 human 0.3, by none 0.

    Other counts: one answer means exact match after normalisation (1.0 or 0.0; leave-one-out would leave no one).
    Any other count n >= 2 uses the same formula over its n leave-one-out subsets. Note that with fewer than 4
    answers even a unanimous match cannot reach 1.0 (each subset has at most n - 1 < 3 humans): that is the
    official formula applied as is, not a bug here.

    Deviation from the official script, on purpose: it normalises the human answers only with processPunctuation
    and only when they disagree, because the VQA json answers were already normalised when the dataset was made.
    Our references are raw text, so prediction and answers both go through :func:`normalize_vqa_answer`; on
    VQA-normalised answers that changes nothing.
    """
    answers = list(answers)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return 1.0 if pred == gts[0] else 0.0
    matches = sum(g == pred for g in gts)
    # Leaving out human i: the others contain (matches - 1) copies of the prediction if i gave it, else matches.
    per_subset = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(per_subset) / len(per_subset)


def vqa_score(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict:
    """Overall VQA accuracy: ``{"accuracy": percent (0..100, unrounded), "count": n}``, the mean of
    :func:`vqa_accuracy` over the questions. As in the official script, predictions and references must cover
    exactly the same question ids (a missing prediction would otherwise silently raise the score)."""
    _check_same_ids(predictions, references)
    accs = [vqa_accuracy(predictions[qid], references[qid]) for qid in references]
    return {"accuracy": 100.0 * sum(accs) / len(accs), "count": len(accs)}


def _check_same_ids(predictions: Mapping, references: Mapping) -> None:
    if not references:
        raise ValueError("nothing to evaluate: references is empty")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError(
            f"predictions and references must have the same ids: {len(missing)} without a prediction "
            f"(e.g. {missing[:3]}), {len(extra)} without references (e.g. {extra[:3]})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Captions: pure-Python PTBTokenizer (Stanford CoreNLP 3.4.1 as run by the COCO caption evaluation)

# pycocoevalcap/tokenizer/ptbtokenizer.py removes these tokens after tokenising. The bracket names are upper case
# but the tokenizer runs with -lowerCase, so "(" comes out as "-lrb-" and is NOT removed: the official pipeline
# keeps "-lrb-", "-rrb-", "-lsb-", ... in the captions, and so do we.
PTB_PUNCTUATIONS = frozenset(
    ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";")
)

# Character classes of CoreNLP 3.4.1's PTBLexer (JFlex, %caseless: literals match either case, [...] classes do
# not; we match on the original text and lowercase the tokens at the end, as PTBTokenizer -lowerCase does).
_L = r"[^\W\d_\u00B2\u00B3\u00B9\u00BC-\u00BE\u2150-\u218F]"  # a letter (Java isLetter), not a digit or numeral
_AN = rf"(?:{_L}|\d)"
_LETTER = rf"(?:{_L}|[\u00AD\u0300-\u036F])"
# A word may carry digits, and ".", "!" or "?" between letters: "a!b" and "dog.The" are single tokens in 3.4.1.
_WORD = rf"{_LETTER}(?:{_LETTER}|\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\d)*)*"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['`\u0092\u2019\u0091\u2018\u201B]|&apos;)"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_SPACENL = r"(?:[ \t\u00A0\u2000-\u200A\u3000]|\r\n|[\r\n\u2028\u2029\u000B\u000C\u0085])"
_SGML_NAME = r"[A-Za-z][A-Za-z0-9_:.\-]*"
_SGML = (  # <tag attr="v">, </tag>, <!...>
    rf"<(?:[!?][A-Za-z\-][^>\r\n]*|{_SGML_NAME}(?:[ ]+(?:{_SGML_NAME}[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|{_SGML_NAME})"
    rf"|{_SGML_NAME}))*[ ]*/?|/{_SGML_NAME})[ ]*>"
)
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_HYPHEN = r"[\-_\u058A\u2010\u2011]"
_THING_PART = rf"(?:[dDoOlL]{_APOSETC}{_AN})?{_AN}+"
_ABBREV1 = (
    r"(?:(?i:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec|Mon|Tues|Tue|Wed|Thurs|Thu|Fri"
    r"|Ala|Ariz|Calif|Colo|Conn|Ct|Dak|Fla|Ga|Ind|Kans|Kan|Ky|Md|Mich|Minn|Mo|Mont|Neb|Nev|Okla|Penn|Tenn"
    r"|Va|Vt|Wisc|Wis|Wyo|Inc|Cos|Co|Corp|Ptys|Pty|Ptes|Pte|Pptys|Ppty|Pptes|Ppte|Ltd|Plc|Rt|Bancorp|Bhd|Assn"
    r"|Univ|Intl|Sys|tel|est|ext|sq|Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)"
    r"|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash))\."
)
_ABTITLE = (
    r"(?i:Mrs|Mr|Ms|Drs|Dr|Profs|Prof|Sens|Sen|Reps|Rep|Attys|Atty|Lt|Col|Gen|Messrs|Govs|Gov|Adm|Rev|Maj|Sgt"
    r"|Cpl|Pvt|Capt|Ste|St|Ave|Pres|Lieut|Hon|Brig|Comdr|Cmdr|Pfc|Spc|Supts|Supt|Det|Mt|Ft|Adj|Adv|Asst|Assoc"
    r"|Ens|Insp|Mlle|Mme|Msgr|Sfc)|M(?i:iss)"
)
_ABBREV4 = (
    rf"(?:{_ACRO}|(?i:a\.k\.a)|{_ABTITLE}|(?i:vs|Alex|Wm|Jos|Cie|cf|TREAS|Ph|Invt|Elec|Natl|Mfg|Mtg|Dept)"
    r"|[A-Za-z])"
)
# Words after which "U.S." (or "A.") ends a sentence; the first letter is case-sensitive in the lexer.
_SENT_START = (
    r"(?:A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)|I(?i:f|n|t)"
    r"|L(?i:ast)|M(?i:any|ore|r\.|s\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)|S(?i:he|ince|o|ome|uch)"
    r"|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)|Y(?i:et|ou))"
)
_MISC_SYMBOL = (
    "[\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0\u05C3\u05C6\u05F3"
    "\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6-\u07F8\u0964\u0965"
    "\u0E4F\u2020-\u2023\u2032-\u2038\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u22FF"
    "\u2300-\u23FF\u2600-\u26FF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]"
)
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."  # abbreviations only before a number
_FILE_EXT = (
    r"(?i:bat|bmp|bz2|class|cgi|cpp|c|dll|docx|doc|exe|gif|gz|html|htm|h|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt"
    r"|ps|py|sql|tar|txt|wav|x|xml|zip|3gp|wm[va]|avi|flv|mp[34g])"
)
_URL_END = r"[^ \t\n\f\r\"<>|.!?(){},\-]"

_DROP = object()  # action: emit nothing (whitespace, untokenizable characters)
_BACK1 = object()  # action: emit the token, then lex its final period again as a token of its own


def _quotes(left: bool):
    """PTB3 (LaTeX-style) quotes: " -> `` or '', ' -> ` or ', curly quotes to the same ASCII forms."""

    def convert(tok: str) -> str:
        if left:
            tok = re.sub(r"&apos;|'", "`", tok)
            tok = re.sub(r"\"|&quot;", "``", tok)
        else:
            tok = re.sub(r"\"|&quot;", "''", tok.replace("&apos;", "'"))
        tok = re.sub("[\u0091\u2018\u201B\u2039]", "`", tok)
        tok = re.sub("[\u0092\u2019\u203A]", "'", tok)
        tok = re.sub("[\u0093\u201C\u00AB]", "``", tok)
        return re.sub("[\u0094\u201D\u00BB]", "''", tok)

    return convert


def _no_soft_hyphen(tok: str) -> str:
    return tok.replace("\u00AD", "")


def _amp(tok: str) -> str:
    return re.sub(r"(?i:&amp;)", "&", tok)


_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = str.maketrans(
    {"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"}
)

# (patterns, action) in the lexer's rule order. Like JFlex, the lexer takes the longest match over all rules,
# the earlier rule winning a tie. A pattern's optional group "tok" is the token; text after it is trailing
# context ("r1/r2" in JFlex): it counts for the longest match but is lexed again. Alternatives that Python's
# regex engine would not try longest-first are listed as separate patterns of the same rule.
_RULES_SPEC: list[tuple[tuple[str, ...], object]] = [
    (  # assimilations: cannot -> can not, gonna -> gon na, 'tis -> 't is, ...
        (
            r"(?P<tok>(?i:can))(?i:not)", r"(?P<tok>'(?i:t))(?i:was)", rf"(?P<tok>{_APOS}(?i:t))(?i:is)",
            r"(?P<tok>(?i:gon|wan))(?i:na)", r"(?P<tok>(?i:got))(?i:ta)", r"(?P<tok>(?i:lem|gim))(?i:me)",
        ),
        None,
    ),
    ((_SGML,), lambda t: t.replace(" ", "\u00A0")),
    ((r"&(?i:MD|mdash|ndash);", "[\u0096\u0097\u2013\u2014\u2015]"), "--"),
    ((r"&(?i:amp);",), "&"),
    ((r"&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);",), None),
    ((rf"(?P<tok>{_WORD}){_REDAUX}",), _no_soft_hyphen),  # dog|'s, they|'re
    ((rf"(?P<tok>[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*)[nN]{_APOSETC}[tT]",), _no_soft_hyphen),  # do|n't, ca|n't
    ((_WORD,), _no_soft_hyphen),
    (  # words with an apostrophe inside that stay whole
        (
            rf"{_APOS}[nN]{_APOS}", rf"{_APOS}[nN]", rf"[lLdDjJ]{_APOS}", rf"(?i:dunkin){_APOS}",
            rf"(?i:somethin){_APOS}", rf"(?i:ol){_APOS}", rf"{_APOS}(?i:em)", rf"[A-HJ-XZn]{_APOSETC}{_L}{{2,}}",
            rf"{_APOS}[2-9]0(?i:s)", rf"{_APOS}(?i:till?)", rf"{_L}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*",
            rf"{_APOS}(?i:cause)", r"(?i:cont'd)\.?", r"(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
            rf"(?i:o){_APOSETC}(?i:o)",
        ),
        None,
    ),
    ((rf"(?P<tok>[yY]{_APOS}){_L}",), None),  # y'all -> y' all
    ((rf"(?i:https?)://[^ \t\n\f\r\"<>|()]+{_URL_END}",), None),
    (
        (
            rf"(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){{}},]+\.)+[a-zA-Z]{{2,4}}"
            rf"|(?:[^ \t\n\f\r\"`'<>|.!?(){{}}\x2C-\x5F$]+\.)+(?:com|net|org|edu))"  # \x2C-\x5F: CoreNLP's ",-_" range
            rf"(?:/[^ \t\n\f\r\"<>|()]+{_URL_END})?",
        ),
        None,
    ),
    (
        (
            r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00A0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
            r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?",
        ),
        None,
    ),  # e-mail
    ((rf"(?P<tok>{_REDAUX})(?:[^A-Za-z]|$)",), _quotes(False)),
    ((rf"[nN]{_APOSETC}[tT]",), _quotes(False)),
    ((r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}",), None),
    ((r"[\-+]?\d*(?:[.:,\u00AD\u066B\u066C]\d+)+", r"[\-+]?\d+"), _no_soft_hyphen),
    ((r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)",), None),
    ((r"(?:\d{1,4}[\- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}",), lambda t: t.replace(" ", "\u00A0")),
    (("[\u00BC\u00BD\u00BE\u2153-\u215E]",), lambda t: _FRACTIONS.get(t, t)),
    (
        (
            r"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-", r"(?i:C\.D\.s)", r"(?i:pro|anti)-", r"(?i:S)(?:&|(?i:&amp;))(?i:P-500)",
            r"(?i:S)(?:&|(?i:&amp;))(?i:Ls)", rf"(?i:Cap){_APOS}(?i:n)", rf"(?i:c){_APOS}(?i:est)",
        ),
        _amp,
    ),
    ((r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}",), None),  # red/blue
    ((r"[A-Z]*\$", "#"), None),
    (("[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",),
     lambda t: t.translate(_CURRENCY)),
    ((r"(?i:c\+\+|c#|f#)",), None),
    ((rf"#{_L}+",), None),  # #hashtag
    ((r"@[A-Za-z_][A-Za-z0-9_]*",), None),  # @user
    # "U.S." before a typical sentence start: the token keeps its period and a "." token follows.
    ((rf"(?P<tok>{_ACRO}\.){_SPACENL}+{_SENT_START}(?:{_SPACENL}|$)",), _BACK1),
    ((rf"(?P<tok>[A-Za-z])\.{_SPACENL}+{_SENT_START}(?:{_SPACENL}|$)",), None),  # "A." -> "A" "."
    ((rf"(?P<tok>{_ABBREV3}){_SPACENL}?\d",), None),  # "no. 5"
    ((rf"(?P<tok>(?i:pt[ey]|co)\.){_SPACE}(?i:ltd|lim)",), None),  # "Pty. Ltd."
    ((rf"(?P<tok>{_ABBREV1}){_SPACENL}(?:{_SPACENL}|[A-Z]|{_SGML})",), _BACK1),  # "etc." at a sentence end
    ((rf"(?P<tok>{_ABBREV1})(?s:..)",), None),
    ((_ABBREV1,), _BACK1),
    ((rf"{_ABBREV4}\.",), None),
    ((rf"(?P<tok>{_ABBREV4}){_SPACE}",), None),
    ((rf"(?P<tok>{_ACRO}){_SPACENL}",), None),
    ((rf"(?P<tok>{_APOS}[0-9][0-9]){_SPACENL}",), None),  # '90
    ((rf"(?P<tok>{_AN}+(?:\.{_AN}+)*\.{_FILE_EXT})(?:{_SPACENL}|[.?!,\"<])",), None),  # image.jpg
    ((rf"(?P<tok>{_WORD}\.)[,;:]",), _no_soft_hyphen),
    ((r"(?:\([0-9]{3}\)[ \u00A0]?|[0-9]{3}[\- \u00A0.])[0-9]{3}[\- \u00A0.][0-9]{4}",),
     lambda t: t.replace(" ", "\u00A0").replace("(", "-LRB-").replace(")", "-RRB-")),
    ((r"(?P<tok>\"|&quot;)[A-Za-z0-9$]",), _quotes(True)),
    ((r"\"|&quot;",), _quotes(False)),
    ((r"\+", "[%&\u2030\u2031]", r"[~^]", "[|\\\\\u007f]"), None),
    ((r"\[",), "-LSB-"),
    ((r"\]",), "-RSB-"),
    ((r"\{",), "-LCB-"),
    ((r"\}",), "-RCB-"),
    ((r"\(",), "-LRB-"),
    ((r"\)",), "-RRB-"),
    ((r"<<|>>",), None),
    ((r"<|&lt;",), "<"),
    ((r">|&gt;",), ">"),
    (  # smileys, with PTB parentheses: ":)" -> ":-RRB-"
        (r"(?P<tok>[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])(?:\W|_)",  # not before a letter or digit
         r"[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)"),
        lambda t: t.replace("(", "-LRB-").replace(")", "-RRB-"),
    ),
    ((r"-+",), lambda t: "--" if 3 <= len(t) <= 4 else t),
    ((r"\.{3,5}", r"(?:\.[ \u00A0]){2,4}\.", "[\u0085\u2026]"), "..."),
    ((r"@+", r"#+", r"_+"), None),
    ((r"\*+", r"(?:\\\*){1,3}"), None),
    ((r"[,;:]", r"[?!]+", "[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA]", r"=", r"/"), None),
    (
        (
            rf"(?P<tok>[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{_ACRO}\.|[A-Za-z0-9\u00AD]+))+\.)[,;:]",
            rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{_ACRO}\.|[A-Za-z0-9\u00AD]+))+",
        ),
        _no_soft_hyphen,
    ),  # hyphenated: black-and-white, 3-year-old
    ((rf"(?P<tok>{_THING_PART}(?:{_HYPHEN}{_THING_PART})*\.)[,;:]", rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"),
     None),  # letters and digits: 100km, a_b, o'clock
    ((r"(?P<tok>[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+\.)[,;:]", r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"), _amp),  # AT&T
    ((r"(?P<tok>')[A-Za-z][^ \t\n\r\u00A0]",), _quotes(True)),  # opening single quote
    ((_REDAUX,), _quotes(False)),
    (
        (_APOS, r"''", "[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091-\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2}"),
        _quotes(False),
    ),
    ((_MISC_SYMBOL,), None),
    ((r"[ \t\u00A0\u2000-\u200A\u3000\r\n\u2028\u2029\u000B\u000C\u0085\u0000\u200B\u200E\u200F\uFEFF]+",
      r"(?i:&nbsp;)"), _DROP),
]
_RULES = [([re.compile(p) for p in patterns], action) for patterns, action in _RULES_SPEC]
# Most tokens are plain words followed by a space; no rule makes anything else of them but the assimilations.
_FAST_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|$)")
_ASSIMILATIONS = frozenset(("cannot", "gonna", "gotta", "lemme", "gimme", "wanna"))
# COCO tokenizes all captions as one file, one per line, and a few abbreviation rules peek at the next line
# ("U.S." then "A man ..." ends a sentence). We assume the next caption starts like most COCO captions do.
_NEXT_LINE = "\nA a"


def _lex(text: str) -> list[str]:
    end = len(text)
    text += _NEXT_LINE
    tokens: list[str] = []
    pos = 0
    while pos < end:
        fast = _FAST_WORD.match(text, pos)
        if fast is not None and fast.group().lower() not in _ASSIMILATIONS:
            tokens.append(fast.group())
            pos = fast.end()
            continue
        best_len, best = 0, None
        for patterns, action in _RULES:
            for rx in patterns:
                m = rx.match(text, pos)
                if m is not None and m.end() - pos > best_len:
                    best_len, best = m.end() - pos, (m, action)
        if best is None:  # untokenizable character: PTBTokenizer deletes it (with a warning)
            pos += 1
            continue
        m, action = best
        tok = m.group("tok") if "tok" in m.re.groupindex else m.group()
        pos += len(tok)
        if action is _DROP:
            continue
        if action is _BACK1:
            pos -= 1
        elif isinstance(action, str):
            tok = action
        elif action is not None:
            tok = action(tok)
        if tok:  # a lone soft hyphen lexes as a word and comes out empty
            tokens.append(tok)
    return tokens


def ptb_tokenize(text: str) -> str:
    """A caption as the COCO caption evaluation tokenizes it (pycocoevalcap PTBTokenizer, which runs Stanford
    CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` and then drops the tokens in its PUNCTUATIONS list):
    a space-separated, lowercased string of PTB tokens without punctuation.

    "A man's dog doesn't like the (red) ball." -> "a man 's dog does n't like the -lrb- red -rrb- ball". Hyphenated
    words, numbers like "3.5" / "1,000" and "red/blue" stay whole; "cannot" -> "can not"; quotes and dashes go.
    Like the official pipeline, "(" becomes "-lrb-" and stays (its PUNCTUATIONS list has "-LRB-" in upper case).

    A pure-Python rewrite of the JFlex lexer's rules (longest match, first rule on a tie), checked token for token
    against the real jar on realistic and random text (tests/test_metrics.py re-runs it where Java is installed);
    rare corners (HTML entities, odd URLs) may still differ. One choice: COCO tokenizes all captions as one file,
    and a few abbreviation rules look at the next line, so a caption is tokenized as if the next one began "A ..."
    ("... in the U.S." -> "u.s. ." then dropped ".", exactly what most COCO orderings give).
    """
    tokens = _lex(str(text).replace("\n", " "))
    return " ".join(t for t in " ".join(tokens).lower().split(" ") if t not in PTB_PUNCTUATIONS)


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict:
    """COCO caption metrics: ``{"BLEU-1".."BLEU-4", "CIDEr", "count"}``, as pycocoevalcap's ``Bleu(4)`` and
    ``Cider()`` compute them on :func:`ptb_tokenize`-d captions (raw values: BLEU in 0..1, CIDEr typically 0..~3
    with 10 the maximum; papers print both x100).

    BLEU is corpus-level (clipped n-gram counts summed over all images, brevity penalty against the closest
    reference length). CIDEr is CIDEr-D: TF-IDF n-gram vectors (n = 1..4) whose document frequencies come from the
    references of the images evaluated here, clipped hypothesis counts, a Gaussian length penalty (sigma 6),
    averaged over references and scaled by 10. Because of that IDF, CIDEr needs several images: on one image every
    n-gram is in every "document" and the score is 0.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    _check_same_ids(predictions, references)
    res, gts = {}, {}
    for key, refs in references.items():
        refs = list(refs)
        if not refs:
            raise ValueError(f"image {key!r} has no reference captions")
        gts[key] = [ptb_tokenize(r) for r in refs]
        res[key] = [ptb_tokenize(predictions[key])]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["CIDEr"] = float(cider)
    scores["count"] = len(res)
    return scores
