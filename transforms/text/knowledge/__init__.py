"""The knowledge base shipped as package data and its retrieval (see `retrieval`)."""

from transforms.text.knowledge.retrieval import (
    ABBREVIATIONS,
    COMPLAINT_WEIGHT,
    DEFAULT_TOP_K,
    KnowledgeRetriever,
    Snippet,
    check_model_dir,
    default_knowledge_base_path,
    default_model_path,
    expand_abbreviations,
    load_knowledge_base,
    load_model,
    local_model_dir,
    normalize_text,
    parse_knowledge_base,
    query_parts,
    rank_snippets,
)

__all__ = [
    "ABBREVIATIONS",
    "COMPLAINT_WEIGHT",
    "DEFAULT_TOP_K",
    "KnowledgeRetriever",
    "Snippet",
    "check_model_dir",
    "default_knowledge_base_path",
    "default_model_path",
    "expand_abbreviations",
    "load_knowledge_base",
    "load_model",
    "local_model_dir",
    "normalize_text",
    "parse_knowledge_base",
    "query_parts",
    "rank_snippets",
]
