"""Validates answers against a JSON schema with the `jsonschema` package (an implementation
independent of pagoda's grammar engine). Used by tests/structured.rs.

    python tests/support/validate_json.py SCHEMA.json ANSWERS.jsonl

Each line of ANSWERS.jsonl is a JSON string: one answer's text. Prints one line per answer
that does not parse or does not validate, and a summary; exits 1 if there was any.
"""

import json
import sys

import jsonschema


def main() -> int:
    schema = json.load(open(sys.argv[1], encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    bad = 0
    n = 0
    for n, line in enumerate(open(sys.argv[2], encoding="utf-8"), start=1):
        text = json.loads(line)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            print(f"answer {n}: not JSON ({e}): {text!r}")
            bad += 1
            continue
        errors = [e.message for e in validator.iter_errors(value)]
        if errors:
            print(f"answer {n}: invalid ({'; '.join(errors)}): {text!r}")
            bad += 1
    print(f"{n} answers, {bad} invalid")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
