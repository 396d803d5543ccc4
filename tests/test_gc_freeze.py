"""freeze_startup_objects: what is alive once a server's engine is up (model, tokenizer, Ray,
Serve) is never scanned by the garbage collector again; a full collection over ~10^6 start-up
objects holds the GIL for ~200 ms, a stall of the step and of every stream."""
import gc

from raylm.cluster.engine_process import freeze_startup_objects


def test_startup_objects_leave_the_collectors_reach_and_new_ones_stay_in_it():
    startup = [[i] for i in range(100_000)]  # containers: tracked by the collector
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(startup)
        scanned = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert not any(id(o) in scanned for o in startup)
        during_requests = [[i] for i in range(10)]
        scanned = {id(o) for o in gc.get_objects()}
        assert all(id(o) in scanned for o in during_requests)
        del during_requests[:]  # garbage made after start-up is still collected
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
