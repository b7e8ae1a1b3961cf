"""The concept map: codes of several vocabularies grouped into clinical concepts.

Sites code the same disease differently (SNOMED CT at one, ICD-10-CM at
another, ICD-9-CM in old records, local codes in a lab system). Tasks
(population, outcome) and features (condition history, measurements, drug
classes) speak in concepts; this module says which codes make a concept.

`concepts.yaml` beside this file is the documented map; `data/codes.py` is
always merged in, so a code the generator or ingestion writes is never
missing from it. Conditions match exact codes and code-family prefixes
(`ICD10CM//E11` covers every E11 sub-code); measurements and drug classes
match exact codes only.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chronorisk.caching import IdentityCache
from chronorisk.data import codes as vocab
from chronorisk.errors import InputError

CONCEPTS_YAML = Path(__file__).with_name("concepts.yaml")

# data/codes.py diagnosis name -> the concepts its codes belong to
_DIAGNOSIS_CONCEPTS: dict[str, tuple[str, ...]] = {
    "ckd3": ("ckd", "ckd3plus"),
    "ckd4": ("ckd", "ckd3plus"),
    "nephropathy": ("nephropathy", "diabetes"),
    "retinopathy": ("retinopathy", "diabetes"),
    "neuropathy": ("neuropathy", "diabetes"),
}


# ICD codes are sent with and without the dot (ICD10CM//E11.9, ICD10CM//E119, ICD9CM//250.00,
# ICD9CM//25000) and under WHO ICD-10 / bare ICD-9 names: the dot sits at a fixed place, so codes
# are compared without it, under one vocabulary name.
_ICD_VOCABS = {"ICD10CM": "ICD10CM", "ICD10": "ICD10CM", "ICD9CM": "ICD9CM", "ICD9": "ICD9CM"}
ICD_PREFIXES = tuple(f"{v}//" for v in _ICD_VOCABS)


def match_form(code: str) -> str:
    """The form codes are compared in: ICD codes without their dot under one vocabulary name."""
    vocab_part, sep, value = code.partition("//")
    target = _ICD_VOCABS.get(vocab_part)
    if not sep or target is None:
        return code
    return f"{target}//{value.replace('.', '')}"


def match_form_expr(code: pl.Expr) -> pl.Expr:
    """`match_form` as a polars expression (for the distinct codes of a dataset). Literal prefix tests,
    no regular expression: polars compiles a pattern at every run, which cost one patient's eligibility
    milliseconds."""
    form = code
    for source, target in _ICD_VOCABS.items():
        if source != target:
            form = pl.when(code.str.starts_with(f"{source}//")).then(
                pl.lit(f"{target}//") + code.str.strip_prefix(f"{source}//")).otherwise(form)
    icd = pl.any_horizontal(code.str.starts_with(p) for p in ICD_PREFIXES)
    return pl.when(icd).then(form.str.replace_all(".", "", literal=True)).otherwise(code)


def code_matches(code: str, codes: tuple[str, ...], prefixes: tuple[str, ...]) -> bool:
    """Is `code` one of `codes` or in the family of one of `prefixes` (ICD dots ignored)?"""
    form = match_form(code)
    return any(form == match_form(c) for c in codes) or any(form.startswith(match_form(p)) for p in prefixes)


def _check_code(code: str) -> str:
    vocab_part, sep, value = code.partition("//")
    if not sep or not vocab_part or not value:
        raise ValueError(f"code {code!r} is not of the form VOCAB//value")
    return code


class Condition(BaseModel):
    """A clinical condition: its display name, exact codes and code-family prefixes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    display: str
    codes: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    @field_validator("codes", "prefixes")
    @classmethod
    def _codes_well_formed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_code(c) for c in value)

    def matches(self, code: str) -> bool:
        return code_matches(code, self.codes, self.prefixes)


class DrugClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    display: str
    codes: tuple[str, ...] = ()

    @field_validator("codes")
    @classmethod
    def _codes_well_formed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_code(c) for c in value)


# (map, concept) -> expression: one patient's eligibility plan is rebuilt per request
_EXPR_CACHE = IdentityCache(256)
_CONCEPTS_OF_CODE = IdentityCache(16)  # (concept map, concept list) -> {code: its concepts}
_CONCEPT_MEMO_MAX = 200_000  # codes remembered per concept list (a memo past it starts again)


class ConceptMap(BaseModel):
    """Conditions, measurement codes and drug classes, with data/codes.py merged in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    conditions: dict[str, Condition]
    measurements: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    medications: dict[str, DrugClass] = Field(default_factory=dict)

    @field_validator("measurements")
    @classmethod
    def _known_measurements(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for name, codes in value.items():
            if name not in vocab.MEASUREMENTS:
                raise ValueError(
                    f"measurement {name!r} is not in data/codes.py; known: {', '.join(vocab.MEASUREMENTS)}"
                )
            for c in codes:
                _check_code(c)
        return value

    # ---- lookups -------------------------------------------------------------------------
    def condition_names(self) -> list[str]:
        return list(self.conditions)

    def measurement_codes(self) -> dict[str, list[str]]:
        """Measurement name -> every code that carries it (canonical code first)."""
        out: dict[str, list[str]] = {}
        for name, m in vocab.MEASUREMENTS.items():
            codes = [m.code, *m.aliases, *self.measurements.get(name, ())]
            out[name] = list(dict.fromkeys(codes))
        return out

    def drug_class_codes(self) -> dict[str, list[str]]:
        """Drug class -> RxNorm codes, in a stable order."""
        out: dict[str, list[str]] = {name: list(dc.codes) for name, dc in self.medications.items()}
        for med in vocab.MEDICATIONS.values():
            out.setdefault(med.drug_class, [])
            if med.code not in out[med.drug_class]:
                out[med.drug_class].insert(0, med.code)
        return out

    def drug_class_display(self, name: str) -> str:
        dc = self.medications.get(name)
        return dc.display if dc else name.replace("_", " ").capitalize()

    def concepts_of(self, code: str) -> list[str]:
        """Every condition concept a code belongs to (python-side, for one code)."""
        return [name for name, cond in self.conditions.items() if cond.matches(code)]

    def condition_expr(self, name: str, code: pl.Expr | None = None) -> pl.Expr:
        """Boolean polars expression: does `code` belong to condition `name`?"""
        if code is None:  # the usual call, once per concept per plan: built once (expressions are immutable)
            hit = _EXPR_CACHE.get((self,), name)
            if hit is not None:
                return hit
        if name not in self.conditions:
            raise InputError("concept", f"unknown concept {name!r}; known: {', '.join(self.conditions)}")
        return self._form_in(name, match_form_expr(pl.col("code") if code is None else code), cache=code is None)

    def _form_in(self, name: str, col: pl.Expr, *, cache: bool = False) -> pl.Expr:
        """Boolean expression: does the code whose `match_form` is `col` belong to condition `name`?"""
        cond = self.conditions[name]
        expr = col.is_in(sorted({match_form(c) for c in cond.codes})) if cond.codes else pl.lit(False)
        for prefix in dict.fromkeys(match_form(p) for p in cond.prefixes):
            expr = expr | col.str.starts_with(prefix)
        return _EXPR_CACHE.put((self,), name, expr) if cache else expr

    def concept_table(self, codes: pl.LazyFrame, names: list[str] | None = None) -> pl.LazyFrame:
        """Long table (code, concept) for the distinct `codes` (a frame with a `code` column).

        Evaluated on the distinct codes only, so prefix matching costs nothing per event; each code's match
        form is made once and every concept tested on it (a flag column per concept, then long): a plan of a
        few steps whatever the number of concepts.
        """
        chosen = list(dict.fromkeys(names if names is not None else self.condition_names()))
        if not chosen:
            return pl.LazyFrame(schema={"code": pl.String, "concept": pl.String})
        for name in chosen:
            if name not in self.conditions:
                raise InputError("concept", f"unknown concept {name!r}; known: {', '.join(self.conditions)}")
        distinct = codes.select(pl.col("code").drop_nulls()).unique()
        form_expr, flag_exprs = self._concept_flag_exprs(tuple(chosen))
        flags = distinct.with_columns(form_expr).with_columns(flag_exprs)
        return (flags.unpivot(on=chosen, index="code", variable_name="concept", value_name="_hit")
                .filter(pl.col("_hit")).select("code", "concept"))

    def concept_table_of_codes(self, codes: Iterable[str], names: list[str]) -> pl.DataFrame:
        """`concept_table` of these codes, from what it gave each code before: the codes a service meets
        repeat, and one patient's few codes cost a plan start each time otherwise. A code not seen yet is
        run through `concept_table` itself (one rule)."""
        chosen = tuple(dict.fromkeys(names))
        memo = _CONCEPTS_OF_CODE.get((self,), chosen)
        if memo is None or len(memo) > _CONCEPT_MEMO_MAX:
            memo = _CONCEPTS_OF_CODE.put((self,), chosen, {})
        codes = [c for c in dict.fromkeys(codes) if c is not None]
        unseen = [c for c in codes if c not in memo]
        if unseen:
            found: dict[str, list[str]] = {}
            table = self.concept_table(pl.LazyFrame({"code": unseen}, schema={"code": pl.String}), list(chosen))
            for code, concept in table.collect().iter_rows():
                found.setdefault(code, []).append(concept)
            memo.update({c: tuple(found.get(c, ())) for c in unseen})
        rows = [(c, concept) for c in codes for concept in memo[c]]
        return pl.DataFrame(rows, schema={"code": pl.String, "concept": pl.String}, orient="row")

    def _concept_flag_exprs(self, chosen: tuple[str, ...]) -> tuple[pl.Expr, list[pl.Expr]]:
        """The `_form` column (each code's match form, made once for every concept) and a flag per concept
        of `chosen` on it: built once per concept list (expressions are immutable; building them costs
        more than running them on one patient's codes)."""
        hit = _EXPR_CACHE.get((self,), ("flags", chosen))
        if hit is not None:
            return hit
        form = pl.col("_form")
        exprs = (match_form_expr(pl.col("code")).alias("_form"), [self._form_in(n, form).alias(n) for n in chosen])
        return _EXPR_CACHE.put((self,), ("flags", chosen), exprs)

    def known_codes(self) -> set[str]:
        """Exact codes the map knows (conditions, measurements, drugs), for vocabulary selection."""
        known: set[str] = set()
        for cond in self.conditions.values():
            known.update(cond.codes)
        for codes in self.measurement_codes().values():
            known.update(codes)
        for codes in self.drug_class_codes().values():
            known.update(codes)
        return known

    def is_condition_code(self, code: str) -> bool:
        return any(c.matches(code) for c in self.conditions.values())


def _merge_vocabulary(raw: dict) -> dict:
    """Add data/codes.py diagnoses to the YAML conditions (both SNOMED and ICD-10-CM codes)."""
    conditions = raw.setdefault("conditions", {})
    for name, dx in vocab.DIAGNOSES.items():
        for concept in _DIAGNOSIS_CONCEPTS.get(name, (name,)):
            entry = conditions.setdefault(concept, {"display": dx.display, "codes": [], "prefixes": []})
            codes = list(entry.get("codes") or [])
            for code in (dx.snomed, dx.icd10):
                if code not in codes:
                    codes.append(code)
            entry["codes"] = codes
    return raw


def load_concepts(path: Path | str | None = None) -> ConceptMap:
    """Parse a concept map YAML (default: the built-in one) with data/codes.py merged in."""
    if path is None:
        return _builtin_concepts()
    return _parse_concepts(Path(path))


@lru_cache(maxsize=1)
def _builtin_concepts() -> ConceptMap:
    return _parse_concepts(CONCEPTS_YAML)


def _parse_concepts(path: Path) -> ConceptMap:
    if not path.is_file():
        raise InputError(str(path), "concept map file does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise InputError(str(path), "a concept map must be a mapping with a `conditions:` section")
    try:
        return ConceptMap.model_validate(_merge_vocabulary(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InputError(str(path), problems) from None
