"""The item index the engine searches: exact (``flat``) or approximate (``hnsw``, ``ivf``), all with FAISS.

Every kind is built from the artifact's item embeddings when an engine is built (start-up, hot reload,
rebuild) by :func:`service.index.factory.build_index`; the artifact's own ``items.faiss`` (exact) stays as it
is. The metric is the inner product. One class per kind (:mod:`.flat`, :mod:`.hnsw`, :mod:`.ivf`), each an
:class:`~service.index.protocol.ItemIndex`; what they share is in :mod:`.base` and :mod:`.slots`, the search
width of the approximate kinds is calibrated by :mod:`.calibration`, and :mod:`.settings` declares the
settings.

Items are FAISS ids 0, 1, 2, ... ("slots", in insertion order), mapped to engine rows. HNSW cannot remove a
vector, so deleting or replacing an item only marks its slot dead, for every kind: searches pass FAISS a
bitmap of the live slots with the caller's excluded rows cleared (``IDSelectorBitmap`` in the kind's
``SearchParameters``), so neither dead nor excluded items take places in the top k, and an item that is
added again gets a new slot (no duplicates). (An approximate search with at most ``OVERFETCH_MAX`` dead and
excluded slots asks for that many more answers and drops them instead: cheaper.) ``flat`` compacts its dead
slots when they pass a quarter of the index; ``hnsw`` and ``ivf`` keep them until the next build (restart,
reload or rebuild).

An approximate search that finds fewer than the requested items while the index holds more (a small IVF
list, an HNSW walk through excluded nodes) is redone exactly (HNSW: its flat storage, IVF: every list), so
an answer is never short. Ties are broken by row, so replicas with the same items agree whatever order
their slots are in (for ``hnsw`` the graph itself depends on insertion order and build threads, so two
replicas can differ in which near neighbours they find).

Not thread-safe: the engine calls it under its lock. FAISS's OpenMP thread count is per calling thread, so
every call sets it (``MMF_FAISS_THREADS`` for searches and online adds, ``MMF_INDEX_BUILD_THREADS`` for
the build).
"""
