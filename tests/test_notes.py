"""The text stage: knowledge base and retrieval (real MiniLM), the note, its tokens and
segments, determinism, dead letters, and BuildNotes in a TestPipeline, local and gs://."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.test_features import TRIAGE, make_record
from transforms.ledger import LEDGER_TAG
from transforms import features, knowledge, notes, records, storage
from transforms.errors import InputError

MODEL_DIR = Path(knowledge.default_model_path())
CHEXPERT_TOPICS = {
    "cxr_atelectasis", "cxr_cardiomegaly", "cxr_consolidation", "cxr_edema",
    "cxr_pleural_effusion", "cxr_pneumothorax", "cxr_support_devices", "cxr_fracture",
    "cxr_lung_lesion", "cxr_lung_opacity", "cxr_pneumonia", "cxr_enlarged_cardiomediastinum",
    "cxr_pleural_other", "cxr_no_finding", "cxr_projection",
}
# Outcome values and ED diagnosis titles/codes (ed/diagnosis.csv.gz): none may reach the note.
OUTCOME_VALUES = (
    "ADMITTED", "EXPIRED", "Pneumonia, unspecified organism", "Heart failure, unspecified",
    "Syncope and collapse", "Essential (primary) hypertension", "J189", "I509", "R0602",
    "CHF NOS", "23456789", "2180-07-24", "01:00", "2180-08-01",
)
# Words that would only come from outcome fields (generic knowledge may say "diagnosis").
OUTCOME_WORDS = ("admitted", "disposition", "diagnos", "discharge", "expired", "outcome")


@pytest.fixture(scope="module")
def resources() -> notes.TextResources:
    """The real offline MiniLM, bundled knowledge base and tokenizer, loaded once: the same
    process-wide object that BuildNotes' DoFns acquire in the pipeline tests."""
    return notes.shared_text_resources()


@pytest.fixture()
def builder(resources: notes.TextResources) -> notes.NoteBuilder:
    return notes.NoteBuilder(resources, max_text_length=8192)


def _sample(record: records.CohortRecord) -> dict:
    return records.sample_from(record)


def _varied_records(n: int = 12) -> list[records.CohortRecord]:
    complaints = ("Dyspnea", "Chest pain", "SOB", "Cough, Fever", "s/p Fall", "Abd pain",
                  None, "Syncope")
    out = []
    for i in range(n):
        triage = {**TRIAGE, "chiefcomplaint": complaints[i % len(complaints)],
                  "heartrate": str(80 + 7 * i), "o2sat": str(99 - i), "temperature":
                  ("986.0" if i % 5 == 0 else f"{98 + i * 0.3:.1f}")}
        out.append(make_record(record_id=f"dicom-{i:02d}", study_id=50000000 + i,
                               triage=triage if i % 7 != 6 else None))
    return out


# ----------------------------------------------------------------------------- knowledge base
def test_bundled_knowledge_base_is_complete() -> None:
    snippets = knowledge.load_knowledge_base()
    assert 250 <= len(snippets) <= 320
    assert [s.id for s in snippets] == sorted({s.id for s in snippets})
    topics = {s.topic for s in snippets}
    assert CHEXPERT_TOPICS <= topics
    assert {"dyspnea", "chest_pain", "cough", "fever", "syncope", "falls", "weakness",
            "abdominal_pain", "altered_mental_status", "trauma", "transfer",
            "vitals_heart_rate", "vitals_oxygen_saturation", "vitals_shock_index"} <= topics
    for s in snippets:
        assert 20 <= len(s.text) <= 300 and s.source, s.id
    ap_pa = [s.text for s in snippets if s.topic == "cxr_projection"]
    assert any("AP" in t for t in ap_pa) and any("PA" in t for t in ap_pa)


@pytest.mark.parametrize("text, message", [
    ('{"id": "a", "topic": "t", "text": "x"', "line 1: not JSON"),
    ('{"id": "a", "topic": "t", "text": "x"}', "line 1: field(s) source missing"),
    ('{"id": "a", "topic": "t", "text": "", "source": "s"}', "field(s) text missing"),
    ('["a"]', "expected a JSON object"),
    ('{"id": "a", "topic": "t", "text": "x", "source": "s"}\n\n'
     '{"id": "a", "topic": "t", "text": "y", "source": "s"}', "line 3: duplicate id 'a'"),
    ("\n", "has no snippets"),
])
def test_malformed_knowledge_base_names_file_and_line(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        knowledge.parse_knowledge_base(text, "kb.jsonl")


def test_missing_knowledge_base_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--knowledge_base .*missing.jsonl: cannot read"):
        knowledge.load_knowledge_base(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("complaint, findings, expected", [
    ("SOB", ("tachycardia", "hypoxia"), ("shortness of breath", ("hypoxia", "tachycardia"))),
    ("  Abd pain, N/V ", (), ("abdominal pain, nausea and vomiting", ())),
    ("s/p Fall", (), ("status post fall", ())),
    ("R Flank pain", ("fever", "Fever ", ""), ("right flank pain", ("fever",))),
    ("SOB/DOE", (), ("sob/doe", ())),  # only whole abbreviations are expanded
    ("Sickle cell", (), ("sickle cell", ())),
    (None, ("hypotension",), ("", ("hypotension",))),
    ("", (), ("", ())),
])
def test_query_parts(complaint, findings, expected) -> None:
    assert knowledge.query_parts(complaint, findings) == expected


def test_rank_rounds_similarities_and_breaks_ties_by_id() -> None:
    sims = np.array([0.1, 0.70001, 0.70004, 0.3, 0.69], dtype=np.float32)
    # 0.70001 and 0.70004 both round to 0.7: the lower index (smaller id) goes first.
    assert knowledge.rank_snippets(sims, 3) == (1, 2, 4)
    assert knowledge.rank_snippets(sims, 0) == ()
    assert knowledge.rank_snippets(sims, 10) == (1, 2, 4, 3, 0)


# ----------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("complaint, findings, relevant_topics", [
    ("shortness of breath", (), {"dyspnea"}),
    ("SOB", (), {"dyspnea"}),
    ("chest pain", (), {"chest_pain"}),
    ("Chest pain", ("severe hypertension",), {"chest_pain", "vitals_blood_pressure"}),
    ("fever, cough", (), {"fever", "cough", "pneumonia", "sepsis", "dyspnea"}),
    ("s/p Fall", (), {"falls"}),
    ("Syncope", ("bradycardia",), {"syncope", "vitals_heart_rate"}),
    (None, ("hypotension", "elevated shock index"),
     {"vitals_shock_index", "vitals_blood_pressure", "trauma", "sepsis"}),
])
def test_retrieval_is_relevant(resources, complaint, findings, relevant_topics) -> None:
    found = resources.retriever.retrieve(complaint, findings, 3)
    assert len(found) == 3
    assert all(s.topic in relevant_topics for s in found), [(s.id, s.topic) for s in found]


def test_fever_and_cough_retrieve_pneumonia_or_fever_facts(resources) -> None:
    texts = [s.text.lower() for s in resources.retriever.retrieve("Cough, Fever", (), 3)]
    assert all("fever" in t or "pneumonia" in t for t in texts), texts


def test_many_findings_do_not_drown_the_complaint(resources) -> None:
    findings = ("fever", "tachycardia", "tachypnea", "hypoxia")
    found = resources.retriever.retrieve("Dyspnea", findings, 3)
    assert any(s.topic == "dyspnea" for s in found), [(s.id, s.topic) for s in found]
    only_findings = resources.retriever.retrieve(None, findings, 3)
    assert not any(s.topic == "dyspnea" for s in only_findings)


def test_retrieval_empty_query_and_cache(resources) -> None:
    retriever = resources.retriever
    assert retriever.retrieve_ids("", (), 3) == () and retriever.retrieve_ids("  ", ("",)) == ()
    assert retriever.retrieve_ids("dyspnea", (), 0) == ()
    first = retriever.retrieve_ids("Palpitations", ("tachycardia",), 3)
    before = retriever.stats()
    again = retriever.retrieve_ids("  PALPITATIONS ", ("tachycardia",), 3)  # same, normalized
    after = retriever.stats()
    assert again == first
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (2, 0)


def test_cached_and_fresh_rankings_agree(resources) -> None:
    retriever = resources.retriever
    queries = [("Dyspnea", ("hypoxia", "tachycardia")), ("Cough, Fever", ("fever",)),
               ("Weakness", ()), ("Transfer", ("hypotension",))]
    cached = [retriever.retrieve_ids(c, f, 3) for c, f in queries]
    retriever.clear_cache()
    fresh = [retriever.retrieve_ids(c, f, 3) for c, f in reversed(queries)][::-1]
    assert fresh == cached
    # Findings are a set: their order does not matter.
    assert retriever.retrieve_ids("Dyspnea", ("tachycardia", "hypoxia"), 3) == cached[0]


# ----------------------------------------------------------------------------- the note
def test_note_holds_the_facts(builder) -> None:
    record = make_record(triage={**TRIAGE, "heartrate": "112.0", "o2sat": "89.0",
                                 "chiefcomplaint": "SOB"})
    out = builder.build([_sample(record)])[0]
    note = out["enhanced_note"]
    for fact in ("52-year-old female", "arrived by ambulance", "2 prior hospital admissions",
                 "AP view", "2.5 hours after arrival", "Chief complaint: SOB (shortness of "
                 "breath)", "heart rate 112 bpm", "SpO2 89%", "blood pressure 135/77 mmHg",
                 "pain 7/10", "ESI 3", "tachycardia", "hypoxia", "2 measurements",
                 "heart rate 92 bpm", "Aspirin, Furosemide, Lisinopril"):
        assert fact in note, fact
    retrieved = [builder._resources.retriever.snippet(i) for i in out["retrieved_knowledge"]]
    assert len(retrieved) == 3 and all(s.text in note for s in retrieved)
    assert [name for name, _, _ in out["attention_segments"]] == [
        "special", *notes.SECTIONS, "special"]


def test_note_has_no_outcome_or_label(builder) -> None:
    # Outcomes smuggled into the record's dicts must still never reach the note.
    record = make_record(
        hadm_id=23456789,
        stay={**make_record().stay, "disposition": "ADMITTED"},
        patient={**make_record().patient, "dod": "2180-08-01"},
        labels=(1.0,) * 14,
    )
    out = builder.build([_sample(record)])[0]
    note = out["enhanced_note"]
    for text in OUTCOME_VALUES:
        assert text not in note, text
    facts = note.split("\nRelated knowledge:")[0].lower()
    for word in OUTCOME_WORDS:
        assert word not in facts, word
    # The same note as without the smuggled outcomes: they changed nothing.
    assert note == builder.build([_sample(make_record())])[0]["enhanced_note"]


def test_note_for_missing_everything(builder) -> None:
    record = make_record(triage=None, patient=None, vitals=(), medications=(),
                         stay={"intime": None, "outtime": None, "gender": None, "race": None,
                               "arrival_transport": None})
    out = builder.build([_sample(record)])[0]
    note = out["enhanced_note"]
    for text in ("unknown age", "sex not recorded", "arrival mode not recorded",
                 "Chief complaint: not recorded.", "no triage assessment recorded",
                 "Vital signs before the X-ray: none recorded.",
                 "Medications: none reconciled", "Related knowledge: none retrieved."):
        assert text in note, text
    assert out["retrieved_knowledge"] == []
    assert not out["clinical_mask"][:-4].any()


def test_implausible_values_are_not_in_the_note(builder) -> None:
    triage = {**TRIAGE, "temperature": "986.0", "o2sat": "1000.0", "heartrate": "0.0",
              "pain": "uta"}
    out = builder.build([_sample(make_record(triage=triage, vitals=()))])[0]
    note = out["enhanced_note"]
    assert "986" not in note and "1000" not in note
    assert "temperature not recorded, heart rate not recorded" in note
    assert "SpO2 not recorded" in note and "pain not recorded" in note
    mask = dict(zip(features.FEATURE_NAMES, out["clinical_mask"]))
    assert not any(mask[f"triage_{v}"] for v in ("temperature", "o2sat", "heartrate", "pain"))


# ----------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("max_length", [2, 3, 32, 200, 8192])
def test_tokens_fit_and_segments_cover_them(resources, max_length) -> None:
    build = notes.NoteBuilder(resources, max_text_length=max_length)
    for out in build.build([_sample(r) for r in _varied_records(4)]):
        ids, segments = out["text_input_ids"], out["attention_segments"]
        assert ids.dtype == np.int32 and 2 <= len(ids) <= max_length
        assert ids[0] == resources.tokenizer.cls_token_id
        assert ids[-1] == resources.tokenizer.sep_token_id
        assert segments[0] == ("special", 0, 1)
        assert segments[-1] == ("special", len(ids) - 1, len(ids))
        assert all(start < end for _, start, end in segments)
        assert all(a[2] == b[1] for a, b in zip(segments, segments[1:]))  # no gap, no overlap
        names = [n for n, _, _ in segments[1:-1]]
        assert names == list(notes.SECTIONS[: len(names)])


def test_truncation_at_32_keeps_the_first_sections(builder, resources) -> None:
    record = _varied_records(1)[0]
    full = builder.build([_sample(record)])[0]["text_input_ids"]
    short = notes.NoteBuilder(resources, max_text_length=32).build([_sample(record)])[0]
    assert len(full) > 32 and len(short["text_input_ids"]) == 32
    assert np.array_equal(short["text_input_ids"][:31], full[:31])
    assert short["enhanced_note"] == builder.build([_sample(record)])[0]["enhanced_note"]


def test_section_tokens_are_the_note_tokens(builder, resources) -> None:
    out = builder.build([_sample(_varied_records(2)[1])])[0]
    plain = resources.tokenizer(out["enhanced_note"], add_special_tokens=False)["input_ids"]
    assert out["text_input_ids"][1:-1].tolist() == plain


def test_long_note_is_cut_at_8192(builder) -> None:
    meds = tuple(f"Medication number {i} extended release tablet" for i in range(3000))
    out = builder.build([_sample(make_record(medications=meds))])[0]
    ids, segments = out["text_input_ids"], out["attention_segments"]
    assert len(ids) == 8192
    assert [n for n, _, _ in segments][-2:] == ["medications", "special"]
    assert segments[-1] == ("special", 8191, 8192)


@pytest.mark.parametrize("lengths, max_length, expected", [
    ((3, 2), 2, [("special", 0, 1), ("special", 1, 2)]),
    ((3, 2), 3, [("special", 0, 1), ("a", 1, 2), ("special", 2, 3)]),
    ((3, 2), 6, [("special", 0, 1), ("a", 1, 4), ("b", 4, 5), ("special", 5, 6)]),
    ((3, 0, 2), 100, [("special", 0, 1), ("a", 1, 4), ("c", 4, 6), ("special", 6, 7)]),
])
def test_assemble_tokens(lengths, max_length, expected) -> None:
    names = "abc"
    sections = [(names[i], [100 + i] * n) for i, n in enumerate(lengths)]
    ids, segments = notes.assemble_tokens(sections, 101, 102, max_length)
    assert segments == expected
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) == expected[-1][2]


def test_assemble_tokens_rejects_no_room() -> None:
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        notes.assemble_tokens([("a", [1])], 101, 102, 1)


# ----------------------------------------------------------------------------- determinism
def _canonical(sample: dict) -> tuple:
    """A sample as plain comparable values (numpy arrays as dtype + bytes)."""
    return (
        sample["cohort"].record_id,
        sample.get("image"),
        sample["enhanced_note"],
        sample["text_input_ids"].dtype.str, sample["text_input_ids"].tobytes(),
        tuple(tuple(s) for s in sample["attention_segments"]),
        sample["clinical_data"].dtype.str, sample["clinical_data"].tobytes(),
        sample["clinical_mask"].dtype.str, sample["clinical_mask"].tobytes(),
        tuple(sample["retrieved_knowledge"]),
    )


def test_same_output_in_one_or_several_batches(resources) -> None:
    samples = [_sample(r) for r in _varied_records(12)]
    builder = notes.NoteBuilder(resources, max_text_length=256)
    resources.retriever.clear_cache()
    one_batch = [_canonical(o) for o in builder.build(samples)]
    resources.retriever.clear_cache()
    several = []
    for start in reversed(range(0, 12, 5)):  # other batches, other order, cold cache
        several[:0] = [_canonical(o) for o in builder.build(samples[start:start + 5])]
    assert several == one_batch


def test_threads_share_the_resources_safely(resources) -> None:
    samples = [_sample(r) for r in _varied_records(24)]
    builder = notes.NoteBuilder(resources, max_text_length=512)
    sequential = [_canonical(o) for o in builder.build(samples)]
    resources.retriever.clear_cache()
    batches = [samples[i:i + 3] for i in range(0, 24, 3)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = [_canonical(o) for out in pool.map(builder.build, batches) for o in out]
    assert parallel == sequential


# ----------------------------------------------------------------------------- dead letters
def test_malformed_text_is_a_dead_letter_without_the_text(builder, caplog) -> None:
    bad = make_record(record_id="bad", triage={**TRIAGE, "chiefcomplaint": "cough \ud800"})
    good = make_record(record_id="good")
    results = builder.build([_sample(bad), _sample(good)])
    assert results[0] == records.DeadLetter(
        "bad", bad.subject_id, bad.study_id, "text", records.FAIL_TEXT, "UnicodeEncodeError")
    assert results[1]["cohort"].record_id == "good"
    assert "cough" not in caplog.text


def test_input_sample_is_not_modified(builder) -> None:
    sample = {**_sample(make_record()), "image": "kept"}
    out = builder.build([sample])[0]
    assert set(sample) == {"cohort", "image"} and out["image"] == "kept"
    assert out is not sample


# ----------------------------------------------------------------------------- Beam
def test_build_notes_in_a_pipeline(resources) -> None:
    inputs = [{**_sample(r), "image": f"img-{i}"} for i, r in enumerate(_varied_records(10))]
    bad = make_record(record_id="bad", triage={**TRIAGE, "chiefcomplaint": "fever \ud800"})
    expected = [_canonical(o) for o in notes.NoteBuilder(resources, 128).build(inputs)]
    before = resources.retriever.stats()
    options = PipelineOptions(["--runner=FnApiRunner"])
    with test_pipeline.TestPipeline(options=options) as p:
        out = (
            p
            | "Create" >> beam.Create(inputs + [_sample(bad)])
            | "Notes" >> notes.BuildNotes(max_text_length=128, batch_size=4)
        )
        assert set(out) == {records.SAMPLES_TAG, records.DEAD_LETTER_TAG, LEDGER_TAG}
        assert_that(out[LEDGER_TAG], equal_to([(notes.FAILED_TEXT, 1)]), label="Ledger")
        assert_that(out[records.SAMPLES_TAG] | "Canonical" >> beam.Map(_canonical),
                    equal_to(expected), label="Samples")
        assert_that(out[records.DEAD_LETTER_TAG], equal_to([records.DeadLetter(
            "bad", bad.subject_id, bad.study_id, "text", records.FAIL_TEXT,
            "UnicodeEncodeError")]), label="DeadLetters")
    # The DoFns used this process's loaded model and its cache: nothing was embedded again.
    after = resources.retriever.stats()
    assert after["misses"] == before["misses"] and after["hits"] > before["hits"]


@pytest.mark.parametrize("kwargs, message", [
    ({"knowledge_base": "/nonexistent/kb.jsonl"}, "--knowledge_base /nonexistent"),
    ({"embedding_model": "/nonexistent/model"}, "--embedding_model /nonexistent/model"),
    ({"tokenizer": "/nonexistent/tok"}, "--tokenizer /nonexistent/tok"),
])
def test_unusable_text_inputs_are_named(kwargs, message) -> None:
    with pytest.raises(InputError, match=message):
        notes.check_text_config(**kwargs)


def test_gs_model_tokenizer_and_knowledge_base(gcs_emulator: str, resources) -> None:
    """Everything from gs://: the model and tokenizer folders are copied once, then loaded."""
    root = f"{gcs_emulator}/text-config"
    for path in sorted(p for p in MODEL_DIR.rglob("*") if p.is_file()):
        storage.write_bytes(f"{root}/model/{path.relative_to(MODEL_DIR).as_posix()}",
                           path.read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        storage.write_bytes(f"{root}/tokenizer/{name}", (MODEL_DIR / name).read_bytes())
    lines = Path(knowledge.default_knowledge_base_path()).read_text().splitlines()
    small = [json.loads(l) for l in lines if json.loads(l)["topic"] in ("dyspnea", "falls")]
    storage.write_bytes(f"{root}/kb.jsonl",
                       "\n".join(json.dumps(s) for s in small).encode("utf-8"))

    notes.check_text_config(f"{root}/model", f"{root}/kb.jsonl", f"{root}/tokenizer")
    remote = notes.load_text_resources(f"{root}/model", f"{root}/kb.jsonl",
                                       f"{root}/tokenizer")
    assert len(remote.retriever.snippets) == len(small)
    found = remote.retriever.retrieve("s/p Fall", (), 2)
    assert {s.topic for s in found} == {"falls"}
    record = make_record()
    local_out = notes.NoteBuilder(resources, 64).build([_sample(record)])[0]
    remote_out = notes.NoteBuilder(remote, 64).build([_sample(record)])[0]
    # Same tokenizer, same features; the note differs only in its retrieved knowledge.
    assert np.array_equal(local_out["text_input_ids"][:20], remote_out["text_input_ids"][:20])
    assert np.array_equal(local_out["clinical_data"], remote_out["clinical_data"])
    with pytest.raises(InputError, match="--tokenizer gs://.*none of tokenizer.json"):
        notes.check_text_config(tokenizer=f"{root}/nothing-here")

