def is_faiss_available():
    """Walden is not milvus-lite: its FAISS-specific tests do not apply."""
    return False
