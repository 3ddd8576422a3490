/* The C API of the memprof-limits sampler, as seen by Python through cffi.
 *
 * build_ffi.py feeds the part between the CDEF markers to ffi.cdef(), so it
 * must stay plain C declarations (no #include, no macros with arguments).
 * Python calls every function through ctypes.PyDLL, which keeps the GIL held
 * for the whole call (cffi's calls release it: getting it back can take a
 * switch interval); cffi gives the types.  Functions marked [GIL] need the
 * GIL; the others would not.  The [GIL] entry points that take Python
 * objects are declared after CDEF-END.
 */
#ifndef MEMPROF_LIMITS_SAMPLER_H
#define MEMPROF_LIMITS_SAMPLER_H
#include <stdint.h>

/* CDEF-BEGIN */

/* Reasons for an interrupt, as bits of ml_ctl_t.pending. */
#define ML_REASON_MEMORY 1
#define ML_REASON_ALLOCATIONS 2
#define ML_REASON_TOKEN 4

/* The one-cause rule's bounds (ml_ctl_t.hold_until, grace_until,
 * handler_rounds): bytes after an interrupt's creation before a sample may
 * arm it again (unwinding a thousand frames allocates about 150 kB); bytes
 * and watchdog rounds a handler of it may take before it is re-delivered
 * inside the handler. */
#define ML_REDELIVER_HOLD 1048576
#define ML_HANDLER_GRACE 16777216
#define ML_HANDLER_ROUNDS 10

/* Most token scopes open at once on one thread. */
#define ML_MAX_TOKENS 32

/* Errors returned by ml_start / ml_stop. */
#define ML_OK 0
#define ML_ERR_ALREADY_STARTED 1
#define ML_ERR_NOT_STARTED 2
#define ML_ERR_NOT_ON_TOP 3
#define ML_ERR_RATE 4

/* The boundaries of one scope's task, for exact counts (masking.c,
 * task_begin/task_end).  Owned by the scope (ffi.new); linked from its
 * thread's control block while the scope is open.  Owner thread, GIL. */
typedef struct ml_marks {
    int64_t limit;        /* the scope's allocation limit; < 0: none */
    int64_t outer_end;    /* the budget end of the scopes around it */
    int64_t start;        /* ml_allocated() when the task started */
    int64_t end;          /* start + limit (saturated): the scope's budget end */
    int64_t task_end;     /* ml_allocated() when the task ended (the last exit) */
    struct ml_marks *prev; /* the enclosing open scope's marks, or NULL */
} ml_marks_t;

/* Per-thread control block for interrupt delivery.  Its memory is owned by
 * Python (ffi.new), one per thread that ever ran a task or a masked region;
 * the thread's TLS points to it while the Python owner is alive.  Other
 * threads read it only with the GIL held. */
typedef struct {
    int64_t mask_depth;   /* > 0: masked.  Written by the owner thread with the GIL held. */
    int64_t pending;      /* ML_REASON_* bits wanting an interrupt.  Atomic (hooks may set it
                             without the GIL); only Python clears bits, with the GIL. */
    int64_t active;       /* number of task scopes open on the owner thread; owner, GIL. */
    int64_t watch_global; /* number of those watching the global memory limit; owner, GIL. */
    unsigned long thread_id; /* PyThread_get_thread_ident() of the owner; set once. */
    int64_t arms;         /* interrupts armed for this thread (statistics); GIL or owner. */
    int64_t deferred;     /* arms refused because masked (statistics); GIL or owner. */
    int64_t slow_paths;   /* slow paths taken by the owner (the watchdog's progress probe) */
    /* The flags of the tokens watched by the open scopes: ML_REASON_TOKEN is
     * pending iff one of them is set, so a token set late (after its scope
     * closed) can never interrupt a later task.  Owner writes, with the GIL;
     * the flags themselves are written by Token.set() with the GIL. */
    int64_t *token_flags[ML_MAX_TOKENS];
    int64_t n_tokens;
    /* Python signals whose handlers arrived while masked (bit n: signal n),
     * re-raised with PyErr_SetInterruptEx when the region ends.  Owner, GIL. */
    uint64_t deferred_signals;
    /* Recursion headroom granted to the outermost masked region (Python and,
     * 3.12+, C levels), taken back when it ends.  Owner, GIL. */
    int64_t headroom_py;
    int64_t headroom_c;
    /* 1 while a cyclic collection runs masked on the owner thread (see
     * masking.c, gc_first/gc_last).  Owner, GIL. */
    int64_t gc_masked;
    /* 1 from the moment a task is found over the memory limit until its
     * value is dropped (ml bracket): samples then do not flag the limit again
     * for the scopes around it.  Owner, GIL. */
    int64_t memory_quiet;
    /* Exact task boundaries: a scope's _ml_enter leaves its marks in
     * `entering` as its last step; the C code that called it (the with
     * trampoline, bracket) reads the count right after it returns -- the
     * task's first byte -- and pushes the marks on `top`.  Each exit through
     * that C code stores the count in top->task_end right before the exit
     * bookkeeping runs; the scope pops itself.  Owner, GIL. */
    ml_marks_t *entering;
    ml_marks_t *top;
    /* The one-cause rule's state (sampler.c, held()).  armed_class: the
     * class of the interrupt last armed on the thread and not yet created
     * (borrowed: the classes live for good).  When it is created
     * (quiet_call), samples wait until hold_until (ML_REDELIVER_HOLD bytes
     * later) before arming that class again: while it unwinds towards its
     * handler, each frame adds a traceback entry, created with the exception
     * taken out of the thread state (PyTraceBack_Here), where a sample cannot
     * tell it from a swallowed one.  A handler of the cause is not
     * interrupted by it again until grace_until (ML_HANDLER_GRACE bytes after
     * the creation) or, for the watchdog, ML_HANDLER_ROUNDS of its rounds
     * (handler_rounds counts them): a runaway handler does not escape its
     * limit.  Owner writes with the GIL; the watchdog too, with the GIL. */
    void *armed_class;
    void *hold_class;
    int64_t hold_until;
    int64_t grace_until;
    int64_t handler_rounds;
} ml_ctl_t;

/* Engine life cycle (take the GIL internally). */
int ml_start(double sampling_rate, uint64_t seed);
int ml_stop(void);
int ml_is_started(void);
/* Install (on=1) or remove the free hooks that report frees to the observer
 * (the profiler's tracking of sampled blocks).  ML_ERR_NOT_ON_TOP if another
 * hook was installed after us (off: ours then stay in place, inert). */
int ml_set_free_hooks(int on);
/* Whether NumPy's default data allocator is patched (see ml_numpy_patch). */
int ml_numpy_patched(void);
/* Threads with sampler state (tests: an exited thread leaves nothing). */
int64_t ml_registered_threads(void);
double ml_sampling_rate(void);
int ml_set_sampling_rate(double sampling_rate);

/* Current thread's exact byte count since the engine started, and samples. */
int64_t ml_allocated(void);
int64_t ml_samples(void);
/* End of the current thread's allocation budget, as an absolute ml_allocated()
 * value; INT64_MAX for none.  The slow path sets ML_REASON_ALLOCATIONS in the
 * thread's ctl once ml_allocated() exceeds it, then forgets the budget. */
void ml_set_budget_end(int64_t end);
int64_t ml_budget_end(void);

/* The current thread's control block (NULL for none). */
void ml_set_ctl(ml_ctl_t *ctl);
ml_ctl_t *ml_get_ctl(void);
void ml_detach_ctl(ml_ctl_t *ctl);   /* clears every TLS pointer to ctl (it is being freed) */
void ml_ctl_add_pending(ml_ctl_t *ctl, int64_t bits);
void ml_ctl_clear_pending(ml_ctl_t *ctl, int64_t bits);
/* The reasons pending: ctl->pending, plus ML_REASON_TOKEN if a watched token is set. */
int64_t ml_ctl_pending(ml_ctl_t *ctl);
/* Called right after a reason became pending on any thread (a hook, a token
 * set, a scope opened on a token already set): wakes the watchdog.  Atomic;
 * no GIL needed, allocation-free. */
void ml_pending_changed(void);
/* The watchdog's sleep between its scans, called without the GIL (through
 * cffi): one interval, and if `idle` (its last scan found nothing pending),
 * on until ml_pending_changed() was called after that scan began -- and
 * blocked, not waking, while no task is open (ml_set_tasks_open).  While
 * nothing is pending, the watchdog thus runs no Python at all: the tasks'
 * allocation counts do not depend on it (it would share CPython's free
 * lists with them).  Watchdog thread only. */
void ml_watch_sleep(int64_t interval_ns, int idle);
/* Called by a new watchdog thread first: its first idle sleep ends after one
 * interval (a reason pending before it started is not missed).  Watchdog
 * thread only. */
void ml_watch_restart(void);
/* [GIL] The number of threads with a task open (while 0, the idle watchdog
 * blocks instead of waking every interval). */
void ml_set_tasks_open(int64_t n);
/* [GIL] Whether a thread that runs a task has a reason pending: the
 * watchdog's check after a wake-up, which makes no Python object (a task
 * that has a thread registered here: every thread that opened a scope; the
 * GIL keeps their control blocks and watched token flags alive). */
int ml_any_pending(void);

/* Global memory limit (bytes of resident memory; < 0: none) and RSS. */
void ml_set_global_limit(int64_t bytes);
int64_t ml_global_limit(void);
int64_t ml_rss(void);
int64_t ml_peak_rss(void);          /* highest RSS read since ml_reset_peak_rss */
void ml_reset_peak_rss(void);
/* Read the RSS at samples (for ml_peak_rss) even when no limit needs it. */
void ml_set_track_rss(int on);
/* The RSS read when the global limit was last found exceeded (bytes), and
 * the size of the block being allocated that was counted in with it (a block
 * of 1 MiB or more is checked before its pages are touched: RSS + block over
 * the limit), or 0. */
int64_t ml_over_rss(void);
int64_t ml_over_block(void);
int64_t ml_refused_blocks(void);   /* big blocks refused so far (refuse_big_block) */
int64_t ml_rss_reads(void);

/* Sampler test support: records the byte positions of the current thread's
 * next samples into buf (at most n); returns how many were recorded. */
void ml_record_samples(int64_t *buf, int64_t n);
int64_t ml_recorded_samples(void);

/* CDEF-END */

/* The [GIL] entry points that take or return Python objects or must keep the
 * GIL for the whole call: Python reaches them through ctypes.PyDLL
 * (memprof_limits._sampler), not cffi, whose calls release the GIL.  Their
 * declarations there are checked against these by tests/native/test_binding.py. */
#include <Python.h>

/* Whether the calling thread runs the main interpreter: the C side holds the
 * main interpreter's objects, and only it may set them. */
PyAPI_FUNC(int) ml_in_main_interpreter(void);
/* Hand over the interrupt classes and the Python callbacks (once, at import):
 * 0, or -1 outside the main interpreter. */
PyAPI_FUNC(int) ml_set_classes(PyObject *base, PyObject *memory, PyObject *allocations,
                               PyObject *cancelled, PyObject *flush, PyObject *ensure_ctl,
                               PyObject *deliver, PyObject *after_fork);
/* Arm ctl's thread (another thread) if an interrupt is pending, a task is
 * active and the thread is not masked.  Returns 1 if armed. */
PyAPI_FUNC(int) ml_arm(ml_ctl_t *ctl);
/* The main thread's signal delivery raises `pending`'s interrupt itself: it
 * counts as armed for the one-cause rule. */
PyAPI_FUNC(void) ml_mark_armed(ml_ctl_t *ctl, int64_t pending);
/* Is an asynchronous exception armed on the current thread?  (Tests.) */
PyAPI_FUNC(int) ml_async_exc_armed(void);
/* Patch NumPy's default handler (its address, from the capsule): 1 if patched
 * now, 0 if already, -1 if the layout is unknown. */
PyAPI_FUNC(int) ml_numpy_patch(void *handler);
/* masking.c: the builtins that call Python (masked_call, bracket, the
 * signal-handler wrapper...), as a tuple in their table's order. */
PyAPI_FUNC(PyObject *) ml_builtins(void);

/* The observer of the hooks: the profiler (memprof.c) registers one, so that
 * the sampler never calls it by name (it depends on the sampler, never the
 * reverse).  Its functions run inside allocator hooks: they must not call the
 * C API (beyond reading frames), allocate through PyMem, or raise. */
#define ML_DOMAIN_RAW 0
#define ML_DOMAIN_MEM 1
#define ML_DOMAIN_OBJ 2
typedef struct {
    /* `n_samples` samples fell into the block `ptr` of `size` bytes just
     * allocated by the current thread in `domain` (GIL held unless RAW). */
    void (*on_sample)(void *ptr, size_t size, int64_t n_samples, int domain);
    /* `ptr` is about to be freed or reallocated (while ml_set_free_hooks(1)). */
    void (*on_free)(void *ptr);
    /* The engine stops (GIL held): frees are no longer reported. */
    void (*on_engine_stop)(void);
} ml_observer_t;
/* [GIL] Register the observer (NULL: none; it must stay valid for good: a hook
 * may still read the previous one).  Frees are reported to it while the free
 * hooks are on (ml_set_free_hooks). */
void ml_set_observer(const ml_observer_t *observer);

#endif
