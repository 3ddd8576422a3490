/* memprof-limits statistical profiler: records of the sampler's samples with
 * the Python traceback of the allocation, taken inside the allocator hooks,
 * and the opt-in tracking of which sampled blocks are still alive.
 *
 * The problem
 * -----------
 * The sampler (sampler.c) calls ml_memprof_on_sample() from its slow path
 * for each allocation into which samples fell: on average one every
 * 1/rate bytes.  We want, for each sample, who allocated (thread, Python
 * traceback), how much was requested, and, on request, whether the block is
 * still alive -- so that Python can later estimate the bytes allocated per
 * line or per traceback (each sample stands for 1/rate bytes) without the
 * cost of tracing every allocation.
 *
 * What does not work, and why
 * ---------------------------
 * - Anything tracemalloc does that calls into the interpreter from a hook:
 *   interning filenames in a table of PyObject* (PyObject_Hash), taking the
 *   GIL in RAW hooks with PyGILState_Ensure, raising, failing the allocation.
 *   Our hooks can run while CPython holds HEAD_LOCK (sampler.c), and a RAW
 *   hook that waits for the GIL can deadlock thread deletion.  So the hook
 *   only copies pointers and integers into a buffer of our own.
 * - PyMem_RawMalloc for that buffer: it is hooked (by the sampler itself).
 *   Buffers come from libc malloc; a failure drops the sample (counted).
 * - Line numbers in the hook: PyCode_Addr2Line scans the line table.  The
 *   hook keeps (code object, instruction offset); Python-facing functions
 *   resolve lines later, holding the GIL, outside any hook.
 * - A lock and a hash lookup on every free (tracemalloc: ~150 ns per pair).
 *   Frees of sampled blocks are rare; a lock-free counting filter answers
 *   "not tracked" for nearly every free with one load.
 *
 * The solution
 * ------------
 * - One mutex, S.lock, protects the record buffer and the table of tracked
 *   blocks (the RAW domain runs without the GIL, so the GIL is not enough).
 *   Nothing done while holding it allocates through PyMem, calls Python or
 *   takes another lock except libc malloc's.
 * - With the GIL held (MEM and OBJ domains, and RAW allocations made while
 *   holding the GIL), the hook walks the current thread's interpreter frames
 *   the way tracemalloc does (skipping incomplete frames) and keeps a strong
 *   reference to each code object (Py_INCREF: allowed with the GIL, and it
 *   cannot allocate), with the frame's instruction offset.  That walk is the
 *   one version-specific part of this file (see "Frames").
 * - Without the GIL (RAW), no frame is read and no reference taken: the
 *   record has no traceback and the flag ML_MEMPROF_NO_GIL.
 * - Records are appended to a list of libc-allocated chunks and moved out by
 *   ml_memprof_drain() into a Python list: the chunk list is detached under
 *   the lock, then converted without it (conversion allocates, which runs
 *   the hooks again; a thread-local flag keeps the drain's own allocations
 *   out of the profile).
 * - Tracked blocks: an open-addressing table ptr -> sample id (under the
 *   lock) and g_filter, 2^16 saturating byte counters (64 KiB: fits in L2;
 *   a bigger filter costs a cache miss per free) indexed by a hash of
 *   the pointer, incremented and decremented under the lock, read without
 *   it by ml_memprof_on_free().  A zero counter proves the pointer is not
 *   in the table (a block is inserted before its allocation returns, so any
 *   free of it happens after the increment).  Python asks for the live ids
 *   when it takes a snapshot.
 *
 * Known failure cases
 * -------------------
 * - RAW allocations made without the GIL (compression libraries, threads
 *   without a thread state) have no traceback.
 * - realloc counts as a free of the old block: a tracked block that is
 *   reallocated is reported dead even if realloc kept it in place, or if
 *   realloc failed and the old block survived.
 * - A block freed through a path that bypasses the hooks (freed after the
 *   free hooks were removed) stays "alive" until its address is sampled
 *   again.  ml_stop (engine stopped under the profiler) turns tracking off:
 *   ml_memprof_is_tracking() then says 0, and Python stops reporting
 *   liveness.
 * - The frame walk reads CPython's private frame layout (3.11 to 3.13 only,
 *   like tracemalloc, which relies on the same invariants).
 * - Sub-interpreters with their own GIL (3.12+) are not supported (as in the
 *   sampler): their frames would be read, but the records are shared.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The one version-specific dependency: the layout of interpreter frames
 * (Include/internal/pycore_frame.h), needed to walk the frame stack without
 * creating frame objects.  Py_BUILD_CORE is defined only for this include. */
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE

#include "memprof_api.h"
#include "sampler.h"

#if PY_VERSION_HEX < 0x030B0000 || PY_VERSION_HEX >= 0x030E0000
#error "the memprof-limits profiler supports CPython 3.11 to 3.13"
#endif

#define MP_TLS __thread __attribute__((tls_model("initial-exec")))

/* Set by start/stop with the GIL (and the engine's hooks in place); read by
 * the observer's functions, which re-check ml_memprof_enabled under S.lock. */
static volatile int ml_memprof_enabled;
/* Nonzero while sampled blocks are tracked (the free hooks report frees).
 * Written with the GIL by ml_memprof_start/stop and when the engine stops. */
static volatile int ml_memprof_track_frees;

/* ------------------------------------------------------------------------ */
/* Records. */

typedef struct {
    PyCodeObject *code; /* strong reference, taken with the GIL */
    int32_t lasti;      /* offset of the current instruction, in code units */
    int32_t unused;
} mp_frame_t;

typedef struct {
    uint64_t id;           /* unique in the process, increasing */
    uint64_t thread_id;    /* PyThread_get_thread_ident() = threading.get_ident() */
    uint64_t size;         /* bytes requested */
    int64_t n_samples;     /* samples that fell into the block (>= 1) */
    int32_t domain;        /* ML_DOMAIN_* */
    int32_t flags;         /* ML_MEMPROF_TRACKED, ML_MEMPROF_NO_GIL */
    int32_t nframe;        /* frames kept, innermost first */
    int32_t total_nframe;  /* frames on the stack (capped at MP_MAX_DEPTH) */
    mp_frame_t frames[];
} mp_record_t;

#define MP_RECORD_SIZE(nframe) (sizeof(mp_record_t) + (size_t)(nframe) * sizeof(mp_frame_t))
#define MP_MAX_DEPTH 65535
#define MP_CHUNK_BYTES ((size_t)256 * 1024)

typedef struct mp_chunk {
    struct mp_chunk *next;
    size_t used, cap;        /* bytes of data[] */
    _Alignas(16) unsigned char data[];
} mp_chunk_t;

/* Tracked blocks: key 0 is an empty slot, key 1 a deleted one. */
typedef struct {
    uintptr_t key;
    uint64_t id;
} mp_entry_t;
#define MP_EMPTY ((uintptr_t)0)
#define MP_DELETED ((uintptr_t)1)
#define MP_TABLE_MIN 1024

/* The profiler's state.  Every field is protected by S.lock. */
static struct {
    pthread_mutex_t lock;
    mp_chunk_t *head, *tail;   /* records, oldest first */
    int64_t n_records;         /* records in the chunks */
    int64_t chunk_bytes;       /* bytes malloc'ed for the chunks */
    uint64_t next_id;
    int64_t dropped;           /* samples lost to a malloc failure */
    int max_frames;            /* of the current session */
    int track;                 /* the current session tracks frees */
    mp_entry_t *table;         /* NULL or table_cap entries */
    size_t table_cap;          /* a power of two */
    size_t table_used;         /* live + deleted slots */
    size_t table_live;
} S = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Counting filter of the tracked pointers: written under S.lock, read
 * without it (relaxed atomics).  Saturated counters (255) stay saturated
 * until the table is cleared. */
#define MP_FILTER_BITS 16
static uint8_t g_filter[(size_t)1 << MP_FILTER_BITS];

/* > 0 while this thread drains records: its allocations are not recorded. */
static MP_TLS int t_busy;

static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void atfork_child(void)
{
    /* Only the forking thread survives; if another one held the lock, it
     * never releases it in the child. */
    pthread_mutex_init(&S.lock, NULL);
}

static void once_init(void) { pthread_atfork(NULL, NULL, atfork_child); }

/* ------------------------------------------------------------------------ */
/* Frames.  THE ONE PLACE THAT DEPENDS ON CPYTHON'S PRIVATE FRAME LAYOUT.
 * Called with the GIL held, for the current thread, whose frame stack cannot
 * change while we read it (only its own thread pushes and pops frames, and
 * CPython unlinks a frame before clearing it, gh-99729).  Same walk as
 * tracemalloc's traceback_get_frames (3.12: _PyThreadState_GetFrame and
 * _PyFrame_GetFirstComplete):
 *  - 3.11, 3.12: the innermost frame is tstate->cframe->current_frame; the
 *    code object is frame->f_code; the instruction is frame->prev_instr;
 *  - 3.13: tstate->current_frame; frame->f_executable (a code object, or
 *    None for the C-stack entry frames); frame->instr_ptr;
 *  - all: frames are linked by ->previous; incomplete frames (pushed but not
 *    yet started, and 3.12+ entry frames owned by the C stack) are skipped;
 *    _PyInterpreterFrame_LASTI gives the offset in code units. */
static PyThreadState *gil_holder_tstate(int domain)
{
    /* The current thread's state if this thread holds the GIL, else NULL. */
#if PY_VERSION_HEX >= 0x030D0000
    PyThreadState *ts = PyThreadState_GetUnchecked();
#else
    PyThreadState *ts = _PyThreadState_UncheckedGet();
#endif
    if (domain == ML_DOMAIN_RAW) {
        /* 3.11 returns the GIL holder of the whole runtime, 3.12+ this
         * thread's attached state: compare with this thread's own state
         * (a thread-specific read, no lock). */
        if (ts == NULL || ts != PyGILState_GetThisThreadState()) return NULL;
    }
    return ts;
}

static PyCodeObject *frame_code(_PyInterpreterFrame *f)
{
#if PY_VERSION_HEX >= 0x030D0000
    if (f->owner == FRAME_OWNED_BY_CSTACK || f->f_executable == NULL ||
        !PyCode_Check(f->f_executable))
        return NULL;
#else
#if PY_VERSION_HEX >= 0x030C0000
    if (f->owner == FRAME_OWNED_BY_CSTACK) return NULL;
#endif
    if (f->f_code == NULL) return NULL;
#endif
    if (_PyFrame_IsIncomplete(f)) return NULL;
#if PY_VERSION_HEX >= 0x030D0000
    return (PyCodeObject *)f->f_executable;
#else
    return f->f_code;
#endif
}

static void walk_frames_unlocked(PyThreadState *ts, mp_record_t *rec, int max_frames)
{
#if PY_VERSION_HEX >= 0x030D0000
    _PyInterpreterFrame *f = ts->current_frame;
#else
    _PyInterpreterFrame *f = ts->cframe != NULL ? ts->cframe->current_frame : NULL;
#endif
    int n = 0, total = 0;
    for (; f != NULL && total < MP_MAX_DEPTH; f = f->previous) {
        PyCodeObject *code = frame_code(f);
        if (code == NULL) continue;
        total++;
        if (n < max_frames) {
            Py_INCREF(code);
            rec->frames[n].code = code;
            rec->frames[n].lasti = _PyInterpreterFrame_LASTI(f);
            rec->frames[n].unused = 0;
            n++;
        }
    }
    rec->nframe = n;
    rec->total_nframe = total;
}

/* ------------------------------------------------------------------------ */
/* The record buffer (S.lock held). */

static mp_record_t *reserve_unlocked(size_t bytes)
{
    mp_chunk_t *c = S.tail;
    if (c == NULL || c->cap - c->used < bytes) {
        size_t cap = bytes > MP_CHUNK_BYTES ? bytes : MP_CHUNK_BYTES;
        c = malloc(sizeof(mp_chunk_t) + cap);   /* libc: never through the hooks */
        if (c == NULL) return NULL;
        c->next = NULL;
        c->used = 0;
        c->cap = cap;
        if (S.tail) S.tail->next = c; else S.head = c;
        S.tail = c;
        S.chunk_bytes += (int64_t)(sizeof(mp_chunk_t) + cap);
    }
    return (mp_record_t *)(c->data + c->used);
}

static void commit_unlocked(size_t bytes)
{
    S.tail->used += bytes;   /* bytes is a multiple of 8: records stay aligned */
    S.n_records++;
}

static mp_chunk_t *detach_unlocked(void)
{
    mp_chunk_t *head = S.head;
    S.head = S.tail = NULL;
    S.n_records = 0;
    S.chunk_bytes = 0;
    return head;
}

/* ------------------------------------------------------------------------ */
/* Tracked blocks (S.lock held, except filter reads in ml_memprof_on_free). */

static inline uint64_t hash_ptr(uintptr_t p)
{
    return ((uint64_t)p >> 4) * 0x9E3779B97F4A7C15ull;
}

static inline size_t filter_slot(uintptr_t p)
{
    return (size_t)(hash_ptr(p) >> (64 - MP_FILTER_BITS));
}

static void filter_add_unlocked(uintptr_t p, int delta)
{
    uint8_t *c = &g_filter[filter_slot(p)];
    uint8_t v = __atomic_load_n(c, __ATOMIC_RELAXED);
    if (v == 255) return;                       /* saturated: stays */
    __atomic_store_n(c, (uint8_t)(v + delta), __ATOMIC_RELEASE);
}

static void clear_tracking_unlocked(void)
{
    free(S.table);
    S.table = NULL;
    S.table_cap = S.table_used = S.table_live = 0;
    /* Racing readers may see a partly cleared filter: harmless, as the
     * table is empty now. */
    memset(g_filter, 0, sizeof g_filter);
}

static size_t table_find_slot(const mp_entry_t *table, size_t cap, uintptr_t key)
{
    /* The slot holding key, or the empty slot ending its probe sequence. */
    size_t mask = cap - 1, i = (size_t)(hash_ptr(key) >> 20) & mask;
    while (table[i].key != key && table[i].key != MP_EMPTY) i = (i + 1) & mask;
    return i;
}

static int table_resize_unlocked(size_t cap)
{
    mp_entry_t *t = calloc(cap, sizeof(mp_entry_t));
    if (t == NULL) return -1;
    for (size_t i = 0; i < S.table_cap; i++) {
        uintptr_t k = S.table[i].key;
        if (k != MP_EMPTY && k != MP_DELETED) t[table_find_slot(t, cap, k)] = S.table[i];
    }
    free(S.table);
    S.table = t;
    S.table_cap = cap;
    S.table_used = S.table_live;
    return 0;
}

/* Insert or replace key -> id.  Returns -1 if out of memory. */
static int table_insert_unlocked(uintptr_t key, uint64_t id)
{
    if ((S.table_used + 1) * 2 > S.table_cap) {
        size_t cap = S.table_cap ? S.table_cap : MP_TABLE_MIN;
        while ((S.table_live + 1) * 4 > cap) cap *= 2;   /* load <= 1/4 after */
        if (table_resize_unlocked(cap) < 0) return -1;
    }
    size_t mask = S.table_cap - 1, i = (size_t)(hash_ptr(key) >> 20) & mask;
    size_t first_deleted = SIZE_MAX;
    while (S.table[i].key != MP_EMPTY) {
        if (S.table[i].key == key) {             /* address reused, free missed */
            S.table[i].id = id;
            return 0;
        }
        if (S.table[i].key == MP_DELETED && first_deleted == SIZE_MAX) first_deleted = i;
        i = (i + 1) & mask;
    }
    if (first_deleted != SIZE_MAX) {
        i = first_deleted;
    } else {
        S.table_used++;
    }
    S.table[i].key = key;
    S.table[i].id = id;
    S.table_live++;
    filter_add_unlocked(key, +1);
    return 0;
}

static void table_remove_unlocked(uintptr_t key)
{
    if (S.table == NULL) return;
    size_t i = table_find_slot(S.table, S.table_cap, key);
    if (S.table[i].key != key) return;
    S.table[i].key = MP_DELETED;
    S.table_live--;
    filter_add_unlocked(key, -1);
}

/* ------------------------------------------------------------------------ */
/* Hook side.  No Python API beyond reading frames and Py_INCREF with the
 * GIL; no PyMem; never raises. */

static void ml_memprof_on_sample(void *ptr, size_t size, int64_t n_samples, int domain)
{
    if (t_busy) return;
    PyThreadState *ts = gil_holder_tstate(domain);
    pthread_mutex_lock(&S.lock);
    if (!ml_memprof_enabled) goto out;         /* stopped while we waited */
    int max_frames = ts != NULL ? S.max_frames : 0;
    mp_record_t *rec = reserve_unlocked(MP_RECORD_SIZE(max_frames));
    if (rec == NULL) {
        S.dropped++;
        goto out;
    }
    rec->id = ++S.next_id;
    rec->thread_id = (uint64_t)PyThread_get_thread_ident();
    rec->size = (uint64_t)size;
    rec->n_samples = n_samples;
    rec->domain = domain;
    rec->flags = ts == NULL ? ML_MEMPROF_NO_GIL : 0;
    rec->nframe = rec->total_nframe = 0;
    if (ts != NULL) walk_frames_unlocked(ts, rec, max_frames);
    if (S.track && ptr != NULL && table_insert_unlocked((uintptr_t)ptr, rec->id) == 0)
        rec->flags |= ML_MEMPROF_TRACKED;
    commit_unlocked(MP_RECORD_SIZE(rec->nframe));
out:
    pthread_mutex_unlock(&S.lock);
}

static void ml_memprof_on_free(void *ptr)
{
    uintptr_t p = (uintptr_t)ptr;
    if (__atomic_load_n(&g_filter[filter_slot(p)], __ATOMIC_ACQUIRE) == 0) return;
    pthread_mutex_lock(&S.lock);
    table_remove_unlocked(p);
    pthread_mutex_unlock(&S.lock);
}

/* The engine stops: its free hooks are gone. */
static void ml_memprof_on_engine_stop(void) { ml_memprof_track_frees = 0; }

/* What the sampler calls (ml_set_observer): registered while recording. */
static const ml_observer_t g_observer = {
    ml_memprof_on_sample, ml_memprof_on_free, ml_memprof_on_engine_stop};

/* ------------------------------------------------------------------------ */
/* Python side (cffi: no GIL needed). */

int ml_memprof_is_enabled(void) { return ml_memprof_enabled; }
int ml_memprof_is_tracking(void) { return ml_memprof_track_frees; }

#define LOCKED_READ(expr)                \
    do {                                 \
        pthread_mutex_lock(&S.lock);     \
        int64_t v_ = (int64_t)(expr);    \
        pthread_mutex_unlock(&S.lock);   \
        return v_;                       \
    } while (0)

int64_t ml_memprof_pending_records(void) { LOCKED_READ(S.n_records); }
int64_t ml_memprof_buffer_bytes(void) { LOCKED_READ(S.chunk_bytes); }
int64_t ml_memprof_dropped(void) { LOCKED_READ(S.dropped); }
int64_t ml_memprof_tracked_blocks(void) { LOCKED_READ(S.table_live); }

/* ------------------------------------------------------------------------ */
/* Python side, [GIL] (ctypes.PyDLL). */

static PyObject *record_to_tuple(const mp_record_t *rec)
{
    PyObject *frames = PyTuple_New(2 * (Py_ssize_t)rec->nframe);
    if (frames == NULL) return NULL;
    for (int i = 0; i < rec->nframe; i++) {
        PyCodeObject *code = rec->frames[i].code;
        int lineno = PyCode_Addr2Line(code, rec->frames[i].lasti * (int)sizeof(_Py_CODEUNIT));
        PyObject *line = PyLong_FromLong(lineno < 0 ? 0 : lineno);
        if (line == NULL) {
            Py_DECREF(frames);
            return NULL;
        }
        PyTuple_SET_ITEM(frames, 2 * i, Py_NewRef((PyObject *)code));
        PyTuple_SET_ITEM(frames, 2 * i + 1, line);
    }
    return Py_BuildValue("(KKKLiiiN)", (unsigned long long)rec->id,
                         (unsigned long long)rec->thread_id, (unsigned long long)rec->size,
                         (long long)rec->n_samples, (int)rec->domain, (int)rec->flags,
                         (int)rec->total_nframe, frames);
}

/* Convert the detached chunks into tuples appended to `out` (if not None and
 * no error yet), then release them.  Returns the count, or -1 on error. */
static int release_chunks(mp_chunk_t *c, PyObject *out)
{
    int count = 0, failed = 0;
    t_busy++;
    while (c != NULL) {
        size_t off = 0;
        while (off < c->used) {
            mp_record_t *rec = (mp_record_t *)(c->data + off);
            if (out != NULL && out != Py_None && !failed) {
                PyObject *t = record_to_tuple(rec);
                if (t == NULL || PyList_Append(out, t) < 0) failed = 1;
                Py_XDECREF(t);
                count++;
            }
            for (int i = 0; i < rec->nframe; i++) Py_DECREF(rec->frames[i].code);
            off += MP_RECORD_SIZE(rec->nframe);
        }
        mp_chunk_t *next = c->next;
        free(c);
        c = next;
    }
    t_busy--;
    return failed ? -1 : count;
}

PyAPI_FUNC(int) ml_memprof_drain(PyObject *records)
{
    pthread_mutex_lock(&S.lock);
    mp_chunk_t *head = detach_unlocked();
    pthread_mutex_unlock(&S.lock);
    return release_chunks(head, records);
}

PyAPI_FUNC(void) ml_memprof_discard(void)
{
    pthread_mutex_lock(&S.lock);
    mp_chunk_t *head = detach_unlocked();
    pthread_mutex_unlock(&S.lock);
    release_chunks(head, NULL);
}

PyAPI_FUNC(int) ml_memprof_live_ids(PyObject *live)
{
    /* Copy the ids under the lock, build Python ints without it. */
    pthread_mutex_lock(&S.lock);
    size_t n = S.table_live, k = 0;
    uint64_t *ids = n ? malloc(n * sizeof(uint64_t)) : NULL;
    if (n && ids == NULL) {
        pthread_mutex_unlock(&S.lock);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < S.table_cap && k < n; i++) {
        uintptr_t key = S.table[i].key;
        if (key != MP_EMPTY && key != MP_DELETED) ids[k++] = S.table[i].id;
    }
    pthread_mutex_unlock(&S.lock);
    int rc = 0;
    t_busy++;
    for (size_t i = 0; i < k && rc == 0; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(ids[i]);
        if (v == NULL || PySet_Add(live, v) < 0) rc = -1;
        Py_XDECREF(v);
    }
    t_busy--;
    free(ids);
    return rc < 0 ? -1 : (int)k;
}

PyAPI_FUNC(int) ml_memprof_start(int max_frames, int track_frees)
{
    pthread_once(&g_once, once_init);
    if (max_frames < 0 || max_frames > ML_MEMPROF_MAX_FRAMES) return ML_MEMPROF_ERR_ARG;
    if (ml_memprof_enabled) return ML_ERR_ALREADY_STARTED;
    if (!ml_is_started()) return ML_ERR_NOT_STARTED;
    ml_memprof_discard();
    pthread_mutex_lock(&S.lock);
    S.max_frames = max_frames;
    S.track = track_frees != 0;
    S.dropped = 0;
    clear_tracking_unlocked();
    pthread_mutex_unlock(&S.lock);
    ml_set_observer(&g_observer);
    if (track_frees) {
        /* Not under S.lock: it takes the GIL and the sampler's lock. */
        int rc = ml_set_free_hooks(1);
        if (rc != ML_OK) {
            pthread_mutex_lock(&S.lock);
            S.track = 0;
            pthread_mutex_unlock(&S.lock);
            ml_set_observer(NULL);
            return rc;
        }
        ml_memprof_track_frees = 1;
    }
    ml_memprof_enabled = 1;
    return ML_OK;
}

PyAPI_FUNC(int) ml_memprof_stop(PyObject *records, PyObject *live)
{
    if (!ml_memprof_enabled) return ML_ERR_NOT_STARTED;
    ml_memprof_enabled = 0;        /* hooks re-check it under S.lock */
    int failed = ml_memprof_drain(records) < 0;
    if (!failed && live != NULL && live != Py_None && ml_memprof_track_frees)
        failed = ml_memprof_live_ids(live) < 0;
    if (ml_memprof_track_frees) {
        ml_memprof_track_frees = 0;
        /* Removing the free hooks fails only if another hook was installed
         * on top of the engine's (tracemalloc): they then stay in place,
         * inert (the sampler stops reporting frees), until ml_stop. */
        (void)ml_set_free_hooks(0);
    }
    ml_set_observer(NULL);   /* (a hook may still call it: it re-checks) */
    pthread_mutex_lock(&S.lock);
    S.track = 0;
    clear_tracking_unlocked();
    pthread_mutex_unlock(&S.lock);
    return failed ? -1 : ML_OK;
}
