"""AraBERT's own input preprocessing, for the v02 models (bert-base-arabertv02, the project's classifier base):
what the AraBERT model cards ask for before tokenising. Written for this project from the behaviour of the arabert
package's ArabertPreprocessor("bert-base-arabertv02").preprocess (tests/test_arabert.py checks it is equal on a
golden table of 325 strings, and against the package itself when it is installed); no dependency on it.

v02 uses no Farasa segmentation and drops emoji, so nothing here needs farasapy or emoji. The steps, in order:
 1. HTML entities decoded (&amp; -> &);
 2. harakat, tanwin, shadda, sukun (U+064B-U+0652) and tatweel removed (the superscript alef and the hamza marks are
    kept here and dropped by step 9 as characters outside the vocabulary);
 3. links -> " [رابط] ", e-mail addresses -> " [بريد] ", @mentions -> " [مستخدم] ";
 4. HTML tags removed;
 5. Arabic-Indic digits -> ASCII digits;
 6. a character other than a digit repeated 3 times or more -> twice ("مممممتاز" -> "ممتاز");
 7. a space around every character that is not an Arabic letter, a digit, a Latin letter or a bracket, and between
    digits and Arabic letters ("500ملغ" -> "500 ملغ");
 8. "/" -> "-" (v02's vocabulary has no slash);
 9. every character outside the vocabulary's alphabet (letters, digits, a fixed list of punctuation) -> a space;
10. U+FE0F removed, whitespace collapsed to single spaces.
"""
import html
import re

LINK = " [رابط] "
MAIL = " [بريد] "
USER = " [مستخدم] "

_TASHKEEL_TATWEEL = str.maketrans("", "", "\u064B\u064C\u064D\u064E\u064F\u0650\u0651\u0652\u0640")
# Links, tried one after another (each replacement is final): a domain-like word with an optional scheme, path and
# query; a scheme and URL characters; "www" and URL characters; a Latin word + ".com"; anything from "http" or
# "www" up to the next space; a lone "://".
_LINK_STEPS = [re.compile(p) for p in (
    r"(?:https?://.)?(?:www\.)?[-a-zA-Z0-9@:%._+~#=]{2,256}\.[a-z]{2,6}\b[-a-zA-Z0-9@:%_+.~#?&/=]*",
    r"https?://[-a-zA-Z0-9_./~?=%&]+",
    r"www[-a-zA-Z0-9_?=%&/.~]+",
    r"[a-zA-Z]+\.com",
    r"http\S*",
    r"www\S*",
    r"://",
)]
_MAIL_STEPS = [re.compile(r"[\w-]+@(?:[\w-]+\.)+[\w-]+"), re.compile(r"\S+@\S+")]
_USER = re.compile(r"@\w+")
_TAGS = [(re.compile(r"<br />"), " "), (re.compile(r"</?[^>]+>"), " ")]
_INDIC_DIGITS = str.maketrans("٠١٢٣٤٥٦٧٨٩", "0123456789")
_REPEAT = re.compile(r"(\D)\1{2,}", re.DOTALL)
_AR = "\u0621-\u063A\u0641-\u064A"           # hamza .. ghain, faa .. yaa (no tatweel)
_SPACED = re.compile(rf"([^0-9{_AR}\u0660-\u0669a-zA-Z\[\]])")
_AR_RUN = rf"[{_AR}\u0660-\u066C]+"
_DIGITS_THEN_AR = re.compile(rf"(\d+)({_AR_RUN})")
_AR_THEN_DIGITS = re.compile(rf"({_AR_RUN})(\d+)")
# The alphabet of the v02 vocabulary: digits, Arabic letters and marks U+0621-U+063A and U+0640-U+066C, alef wasla and
# the hamza-carrying alefs U+0671-U+0674, Latin letters, whitespace, and this punctuation.
_PUNCT = "[]!\"#$%'()*+,.:;-<=·>?@\\^_ـ`{|}~—٪’،؟୍“؛”ۚ»«–…‘"
_OUTSIDE = re.compile("[^0-9\u0621-\u063A\u0640-\u066C\u0671-\u0674a-zA-Z\\s" + re.escape(_PUNCT) + "]")


def arabert_preprocess(text):
    """AraBERT v02's preprocessing of one text (ArabertPreprocessor("bert-base-arabertv02").preprocess): see the
    module's docstring for the steps. Used by the scripts' --preprocess arabert, off by default."""
    text = html.unescape(str(text)).translate(_TASHKEEL_TATWEEL)
    for step in _LINK_STEPS:
        text = step.sub(LINK, text)
    for step in _MAIL_STEPS:
        text = step.sub(MAIL, text)
    text = _USER.sub(USER, text)
    for tag, by in _TAGS:
        text = tag.sub(by, text)
    text = _REPEAT.sub(r"\1\1", text.translate(_INDIC_DIGITS))
    text = _SPACED.sub(r" \1 ", text)
    text = _AR_THEN_DIGITS.sub(r" \1 \2 ", _DIGITS_THEN_AR.sub(r" \1 \2 ", text))
    text = _OUTSIDE.sub(" ", text.replace("/", "-"))
    return " ".join(text.replace("\uFE0F", "").split())
