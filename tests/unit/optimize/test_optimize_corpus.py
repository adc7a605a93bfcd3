"""English sentences from the Python help topics: prose kept, code and markup dropped, order stable."""

from __future__ import annotations

from strata.optimize.corpus import clean_sentences, python_doc_sentences

HELP = """\
The "while" statement
*********************

The "while" statement is used for repeated execution as long as an
expression is true:

   while_stmt ::= "while" assignment_expression ":" suite

This repeatedly tests the expression and, if it is true, executes the
first suite. A "break" statement executed in the first suite terminates
the loop without executing the "else" clause's suite.

   >>> while True:
   ...     break

See also: PEP 315.
"""


def test_keeps_prose_sentences_and_drops_headings_grammar_and_code() -> None:
    assert clean_sentences(HELP) == [
        "This repeatedly tests the expression and, if it is true, executes the first suite.",
        'A "break" statement executed in the first suite terminates the loop without executing the "else" '
        "clause's suite.",
    ]


def test_python_docs_give_hundreds_of_distinct_sentences_in_a_stable_order() -> None:
    sentences = python_doc_sentences()
    assert len(sentences) >= 300
    assert len(set(sentences)) == len(sentences)
    assert sentences[:10] == python_doc_sentences(limit=10)
    assert all(s[0].isupper() and s[-1] in ".!?" and ">>>" not in s and "::=" not in s for s in sentences)
