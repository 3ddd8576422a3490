/* The C API of the memprof-limits statistical profiler (memprof.c), as seen
 * by Python.
 *
 * build_ffi.py feeds the part between the CDEF markers to ffi.cdef(), so it
 * must stay plain C declarations.  Those functions take the profiler's lock
 * and need no GIL: memprof_limits.memprof calls them through cffi (which
 * releases the GIL).
 *
 * The functions after CDEF-END are [GIL] functions: they create or release
 * Python objects, so they must be called with the GIL held.  Python reaches
 * them through ctypes.PyDLL, which keeps the GIL and raises the Python
 * exception they set, if any.
 */
#ifndef MEMPROF_LIMITS_MEMPROF_API_H
#define MEMPROF_LIMITS_MEMPROF_API_H
#include <stdint.h>

/* CDEF-BEGIN */

/* Most frames kept per sample (max_frames); deeper stacks are truncated to
 * their innermost frames, and the record keeps the total depth. */
#define ML_MEMPROF_MAX_FRAMES 1024

/* Bits of a record's flags. */
#define ML_MEMPROF_TRACKED 1   /* the block is in the table of tracked blocks */
#define ML_MEMPROF_NO_GIL 2    /* RAW allocation without the GIL: no traceback */

/* Errors of ml_memprof_start / ml_memprof_stop (besides sampler.h's
 * ML_ERR_ALREADY_STARTED, ML_ERR_NOT_STARTED, ML_ERR_NOT_ON_TOP). */
#define ML_MEMPROF_ERR_ARG 16

int ml_memprof_is_enabled(void);
/* Nonzero while frees of sampled blocks are tracked (start(track_frees=1),
 * and nothing stopped the engine since: ml_stop turns tracking off). */
int ml_memprof_is_tracking(void);
/* Records waiting in the C buffer, and the bytes of that buffer. */
int64_t ml_memprof_pending_records(void);
int64_t ml_memprof_buffer_bytes(void);
/* Samples lost because malloc failed, since the last ml_memprof_start. */
int64_t ml_memprof_dropped(void);
/* Tracked blocks still alive (entries of the table). */
int64_t ml_memprof_tracked_blocks(void);

/* CDEF-END */

#include <Python.h>

/* [GIL] Start recording: up to max_frames frames per sample (0 to
 * ML_MEMPROF_MAX_FRAMES), and, if track_frees, install the free hooks and
 * track the sampled blocks.  Discards records left from an earlier session.
 * The engine must be started.  Returns ML_OK or an error code. */
PyAPI_FUNC(int) ml_memprof_start(int max_frames, int track_frees);

/* [GIL] Stop recording; move the remaining records to the list `records`
 * and the ids of the tracked blocks still alive to the set `live` (either
 * may be None), then stop tracking.  Returns ML_OK, ML_ERR_NOT_STARTED, or
 * -1 with a Python exception set (the profiler is stopped anyway). */
PyAPI_FUNC(int) ml_memprof_stop(PyObject *records, PyObject *live);

/* [GIL] Move the records of the C buffer to the list `records`, oldest
 * first.  Each is a tuple
 *     (id, thread_id, size, n_samples, domain, flags, total_nframe, frames)
 * where frames is a flat tuple (code_0, lineno_0, code_1, lineno_1, ...),
 * innermost frame first.  Returns the number of records moved, or -1 with a
 * Python exception set (the records are released anyway). */
PyAPI_FUNC(int) ml_memprof_drain(PyObject *records);

/* [GIL] Add the ids of the tracked blocks still alive to the set `live`.
 * Returns their number, or -1 with a Python exception set. */
PyAPI_FUNC(int) ml_memprof_live_ids(PyObject *live);

/* [GIL] Release the records of the C buffer without returning them. */
PyAPI_FUNC(void) ml_memprof_discard(void);

#endif
