def is_faiss_available():
    """milvus-lite gates its search tests on FAISS, its own search engine. Walden searches with
    its own engine, so the gate's question ("can the server search?") is answered yes."""
    return True
