/* memprof-limits sampler: exact per-thread allocation accounting, geometric
 * sampling and lock-free interrupt arming, hooked into CPython's allocators.
 *
 * The problem
 * -----------
 * We want (1) the exact number of bytes each thread requests through the
 * PyMem/PyObject allocators, to implement deterministic allocation limits;
 * (2) regular, statistically unbiased "samples" of the allocation stream, at
 * which the global memory limit is checked and the profiler records a
 * traceback; (3) a way to interrupt the allocating thread with an
 * asynchronous exception at the next bytecode boundary -- all at a cost close
 * to zero when nothing happens.
 *
 * What does not work, and why
 * ---------------------------
 * - Calling the C API from a hook.  Hooks run with CPython in any state; in
 *   particular _PyThread_CurrentFrames (sys._current_frames) allocates while
 *   holding HEAD_LOCK, and PyThreadState_SetAsyncExc takes HEAD_LOCK: a hook
 *   that calls it deadlocks (tests/native/test_sampler.py reproduces it with
 *   a budget of 0).  So hooks never call into the interpreter, never allocate
 *   through PyMem, never raise.
 * - Counting in the hook with a lock or a hash table (tracemalloc): 150-200 ns
 *   per allocation.  We only subtract from a thread-local countdown.
 * - Hooking free: not needed (limits count allocations, not live bytes), so
 *   the installed free is the original one and frees cost nothing extra.
 * - Headers in front of blocks: impossible for a library installed after
 *   start-up (blocks allocated before would be freed through the wrong path).
 *
 * The solution
 * ------------
 * Per thread (initial-exec TLS, one `sub` and one `js` on the fast path):
 *     countdown = min(next_sample, budget_end) - allocated
 * Every hooked allocation of n bytes does `countdown -= n`; only when it goes
 * below zero (or for a block of 1 MiB or more) does slow_path() run: it
 * records the samples that fell into the allocation (geometric gaps of mean
 * 1/rate bytes, per-thread seeded RNG), notices the end of the allocation
 * budget, reads the RSS for the global limit (at most once per 1/DEFAULT_RATE
 * bytes, and at every big block: RSS + block, as its pages are not touched
 * yet), and, when an interrupt is wanted, the thread is not masked and not
 * already handling that cause, arms it on the *current* thread without
 * taking any lock (arm_current_thread, the one version-specific place).
 * Exact count at any time: consumed + period - countdown.  The masked
 * regions, which call Python, live in masking.c. 
 *
 * RAW hooks run without the GIL: they count (with a per-thread reentrancy
 * guard: what the OBJ/MEM allocator asks of RAW -- pymalloc's fall-back for
 * blocks > 512 bytes, its own bookkeeping -- is not counted again) but never
 * arm; they make the next allocation of any domain
 * take the slow path again, and the next MEM/OBJ allocation (GIL held) arms.
 *
 * The installed allocators keep the original ctx, and the state lives in
 * globals: a torn read of (function, ctx) during installation is harmless
 * (CPython readers take no lock; gh-128679).
 *
 * Known failure cases
 * -------------------
 * - Freelists (floats, tuples, small lists, frames on the data stack) bypass
 *   the allocators: such allocations are invisible, and a loop that does not
 *   allocate is never stopped by an allocation limit (tokens handle it).
 * - realloc counts the new size (the old size is unknown): "bytes requested".
 * - Sub-interpreters with their own GIL (3.12+) are not supported.
 * - A thread still inside a hook when stop() restores the allocators keeps
 *   running our code for a few instructions; the code is never unloaded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <unistd.h>

#include "sampler.h"
#include "internal.h"

#if PY_VERSION_HEX < 0x030B0000 || PY_VERSION_HEX >= 0x030E0000
#error "memprof-limits supports CPython 3.11 to 3.13"
#endif
#ifdef Py_GIL_DISABLED
#error "free-threaded CPython is not supported: arming relies on the GIL"
#endif


#define ML_TLS __thread __attribute__((tls_model("initial-exec")))
#define ML_NO_BUDGET INT64_MAX
#define ML_DEFAULT_RATE (1.0 / 80000.0)

/* ------------------------------------------------------------------------ */
/* Per-thread state.  Thread-local: only the owner thread reads or writes it,
 * except ml_start(), which resets the counters of registered threads while
 * the hooks are not installed (holding g_registry_lock). */
typedef struct ml_tls {
    int64_t countdown;      /* bytes until the slow path; the only hot field */
    int64_t period;         /* countdown when it was last set */
    int64_t consumed;       /* bytes counted before the current period */
    int64_t next_sample;    /* byte position of the next sample */
    int64_t budget_end;     /* allocation budget end, or ML_NO_BUDGET */
    int64_t samples;        /* samples taken since start */
    int64_t last_rss_check; /* byte position of the last RSS read */
    uint64_t rng;           /* xorshift64* state */
    uint64_t epoch;         /* g_epoch when the RNG was seeded; 0: reseed */
    ml_ctl_t *ctl;          /* owned by Python; see ml_set_ctl */
    int64_t *rec_buf;       /* sample positions recorded for tests (Python-owned) */
    int64_t rec_len, rec_n;
    struct ml_tls *next, *prev; /* registry links, protected by g_registry_lock */
    int32_t reentrant;      /* > 0 inside an OBJ/MEM hook's call to the original */
    int32_t state;          /* 0 unregistered, 1 registered, 2 thread exited */
} ml_tls_t;

static ML_TLS ml_tls_t T;

/* ------------------------------------------------------------------------ */
/* Globals.  Written only by ml_start/ml_stop/ml_set_* with the GIL held (and
 * g_lock for start/stop); read by hooks, which tolerate stale values. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER; /* start/stop */
static PyMemAllocatorEx g_orig_raw, g_orig_mem, g_orig_obj; /* set before install */
static PyMemAllocatorEx g_hook_raw, g_hook_mem, g_hook_obj;
static volatile int g_started;            /* GIL + g_lock */
static volatile double g_rate = ML_DEFAULT_RATE;
static volatile double g_log1m_rate;      /* log1p(-g_rate) */
static volatile uint64_t g_seed;
static volatile uint64_t g_epoch;         /* bumped by every ml_start */
static uint64_t g_thread_ordinal;         /* atomic: seeds of new threads */
static volatile int64_t g_global_limit = -1; /* bytes; < 0: none (0 is a real limit) */
/* Minimum bytes between two RSS reads by a thread: 0 at the default rate and
 * below (every sample reads it: interruption after Exp(rate) bytes past the
 * limit, docs/statistical.md); 1/ML_DEFAULT_RATE at higher rates (profiler),
 * so that a high rate does not multiply the ~1 us reads. */
static volatile int64_t g_rss_interval;
/* Opened once per process: at the first import, and again in each fork
 * child (an open /proc/self file keeps naming the process that opened it:
 * a child reading its parent's statm would watch the parent's memory). */
static int g_statm_fd = -1;
static long g_page_size = 4096;
static int64_t g_peak_rss;                /* atomic max */
static volatile int g_track_rss;          /* read RSS at samples even with no limit */
static int64_t g_over_rss;                /* atomic: RSS read when a limit was last found exceeded */
static int64_t g_over_block;              /* atomic: the big block counted in with it, or 0 */
static int64_t g_refused_blocks;          /* atomic: big blocks refused (refuse_big_block) */
/* The observer of the hooks (ml_set_observer): written with the GIL, read by
 * hooks -- a stale read drops or adds one sample, and an observer stays valid
 * for good.  g_track_frees: frees are reported to it (ml_set_free_hooks; GIL
 * and g_lock to write). */
static const ml_observer_t *volatile g_observer;
static volatile int g_track_frees;
#define ML_ON_FREE(ptr)                                                         \
    do {                                                                        \
        if (g_track_frees && (ptr)) {                                           \
            const ml_observer_t *o_ = g_observer;                               \
            if (o_ != NULL) o_->on_free(ptr);                                   \
        }                                                                       \
    } while (0)
static int64_t g_rss_reads;               /* atomic */

/* Exception classes and Python callables: see internal.h.  Set once with
 * the GIL by ml_set_classes, never released; read by hooks with the GIL. */
PyObject *ml_exc_base, *ml_exc_memory, *ml_exc_allocations, *ml_exc_token;
PyObject *ml_py_flush, *ml_py_ensure_ctl, *ml_py_deliver, *ml_py_after_fork;

/* Registry of threads that allocated since the first start, so that ml_start
 * can reset their counters.  Protected by g_registry_lock. */
static pthread_mutex_t g_registry_lock = PTHREAD_MUTEX_INITIALIZER;
static ml_tls_t *g_registry;

/* The watchdog's sleep (sampler.h).  g_pending_seq: bumped (atomically, by
 * any thread, hooks included) right after a reason became pending
 * anywhere; g_watch_seen: its value when the watchdog's current scan
 * began, written and read by the watchdog thread only.  A reason that
 * becomes pending after a scan read its thread's state bumps the sequence
 * after that: the idle sleep in ml_watch_sleep then ends -- no reason is
 * missed. */
static int64_t g_pending_seq;
static int64_t g_watch_seen;
/* Threads with a task open (the size of _delivery's _active, set by Python
 * under its lock): while there is none the idle watchdog blocks on
 * g_watch_cond instead of waking every interval.  Protected by g_watch_lock. */
static pthread_mutex_t g_watch_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_watch_cond = PTHREAD_COND_INITIALIZER;
static int64_t g_tasks_open;

static pthread_key_t g_exit_key;          /* its destructor unregisters */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

/* ------------------------------------------------------------------------ */
/* Random numbers: splitmix64 to seed, xorshift64* to draw. */
static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static int64_t draw_gap(ml_tls_t *t)
{
    /* Geometric number of bytes up to and including the next sampled one:
     * each byte is sampled independently with probability g_rate. */
    uint64_t x = t->rng;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    t->rng = x;
    double u = (double)(((x * 0x2545F4914F6CDD1Dull) >> 11) + 1) * (1.0 / 9007199254740992.0);
    double lr = g_log1m_rate;
    if (lr >= 0.0 || lr == -INFINITY) return 1;            /* rate >= 1 */
    double g = floor(log(u) / lr) + 1.0;                      /* u in (0, 1] */
    return g > 4e18 ? (int64_t)4e18 : (int64_t)g;
}

/* ------------------------------------------------------------------------ */
/* Registry of threads. */
static void thread_exit(void *arg)
{
    ml_tls_t *t = (ml_tls_t *)arg;
    pthread_mutex_lock(&g_registry_lock);
    if (t->state == 1) {
        if (t->prev) t->prev->next = t->next; else g_registry = t->next;
        if (t->next) t->next->prev = t->prev;
    }
    t->state = 2;
    t->ctl = NULL;
    t->rec_buf = NULL;
    pthread_mutex_unlock(&g_registry_lock);
}

static inline int64_t allocated_now(const ml_tls_t *t);
static inline void reset_countdown(ml_tls_t *t, int64_t allocated);

static void atfork_child(void)
{
    /* This process's own resident memory, not the parent's (open and close
     * are async-signal-safe).  Only this thread runs yet: no reader races. */
    int statm = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    if (g_statm_fd >= 0) close(g_statm_fd);
    g_statm_fd = statm;
    g_peak_rss = 0;
    /* Only the forking thread survives: forget the others. */
    pthread_mutex_init(&g_registry_lock, NULL);
    pthread_mutex_init(&g_lock, NULL);
    /* The watchdog is the parent's thread: the child starts its own. */
    pthread_mutex_init(&g_watch_lock, NULL);
    pthread_cond_init(&g_watch_cond, NULL);
    g_tasks_open = 0;
    g_registry = NULL;
    if (T.state == 1) {
        T.next = T.prev = NULL;
        g_registry = &T;
    }
    /* No limit of the parent applies in the child (as in a new thread): its
     * budget, pending reasons, watched tokens and memory watch go.  The
     * Python side (ml_py_after_fork) gives the thread a fresh control block
     * and retires the parent's scopes; this clears what the hooks read
     * before that runs. */
    T.budget_end = ML_NO_BUDGET;
    if (T.state == 1) reset_countdown(&T, allocated_now(&T));
    ml_ctl_t *ctl = T.ctl;
    if (ctl != NULL) {
        ctl->pending = 0;
        ctl->n_tokens = 0;
        ctl->watch_global = 0;
        ctl->deferred_signals = 0;
        ctl->entering = ctl->top = NULL;  /* the parent's scopes' marks */
    }
}

static void once_init(void)
{
    pthread_key_create(&g_exit_key, thread_exit);
    pthread_atfork(NULL, NULL, atfork_child);
    g_page_size = sysconf(_SC_PAGESIZE);
    g_statm_fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
}

/* Seed the RNG and place the first sample, relative to the current count. */
static void reseed(ml_tls_t *t, int64_t allocated)
{
    uint64_t ordinal = __atomic_fetch_add(&g_thread_ordinal, 1, __ATOMIC_RELAXED);
    t->rng = splitmix64(g_seed ^ splitmix64(ordinal + 1)) | 1;
    t->next_sample = allocated + draw_gap(t) - 1;
    t->epoch = g_epoch;
}

static void ensure_registered(ml_tls_t *t)
{
    if (t->state != 0) return;
    pthread_mutex_lock(&g_registry_lock);
    t->prev = NULL;
    t->next = g_registry;
    if (g_registry) g_registry->prev = t;
    g_registry = t;
    t->state = 1;
    pthread_mutex_unlock(&g_registry_lock);
    pthread_setspecific(g_exit_key, t);
}

static inline int64_t allocated_now(const ml_tls_t *t)
{
    return t->consumed + t->period - t->countdown;
}

/* Recompute the countdown to the next event; `allocated` becomes `consumed`. */
static inline void reset_countdown(ml_tls_t *t, int64_t allocated)
{
    int64_t target = t->next_sample < t->budget_end ? t->next_sample : t->budget_end;
    t->consumed = allocated;
    t->period = target - allocated;
    t->countdown = t->period;
}

/* ------------------------------------------------------------------------ */
/* Resident memory, read with pread on a kept-open /proc/self/statm (~1 us);
 * no allocation, usable from hooks. */
static int64_t read_rss(void)
{
    char buf[128];
    if (g_statm_fd < 0) return -1;
    ssize_t n = pread(g_statm_fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = buf;
    while (*p && *p != ' ') p++;           /* skip "size" */
    int64_t pages = 0;
    while (*p == ' ') p++;
    while (*p >= '0' && *p <= '9') pages = pages * 10 + (*p++ - '0');
    int64_t rss = pages * g_page_size;
    __atomic_fetch_add(&g_rss_reads, 1, __ATOMIC_RELAXED);
    int64_t peak = __atomic_load_n(&g_peak_rss, __ATOMIC_RELAXED);
    while (rss > peak &&
           !__atomic_compare_exchange_n(&g_peak_rss, &peak, rss, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return rss;
}

/* ------------------------------------------------------------------------ */
/* Arming an interrupt on the current thread without locks.  THE ONE PLACE
 * THAT DEPENDS ON CPYTHON INTERNALS.  Called with the GIL held (MEM/OBJ hooks
 * or the trampolines below), for the current thread only, so nothing else can
 * write tstate->async_exc concurrently (PyThreadState_SetAsyncExc needs the
 * GIL).  The exception is delivered at the next eval-breaker check exactly as
 * if another thread had called PyThreadState_SetAsyncExc:
 *  - 3.11, 3.12: tstate->async_exc, then _PyEval_SignalAsyncExc(interp)
 *    (exported, Include/internal/pycore_ceval.h), which sets the
 *    interpreter-wide pending.async_exc and eval_breaker flags;
 *  - 3.13: tstate->async_exc, then the per-thread eval_breaker bit
 *    _PY_ASYNC_EXCEPTION_BIT (1 << 3, Include/internal/pycore_ceval.h),
 *    set atomically as _Py_set_eval_breaker_bit does. */
#if PY_VERSION_HEX < 0x030D0000
PyAPI_FUNC(void) _PyEval_SignalAsyncExc(PyInterpreterState *interp);
#endif

int64_t ml_effective_pending(ml_ctl_t *ctl)
{
    int64_t pending = __atomic_load_n(&ctl->pending, __ATOMIC_SEQ_CST);
    for (int64_t i = 0; i < ctl->n_tokens && i < ML_MAX_TOKENS; i++)
        if (__atomic_load_n(ctl->token_flags[i], __ATOMIC_SEQ_CST)) return pending | ML_REASON_TOKEN;
    return pending;
}

int64_t ml_ctl_pending(ml_ctl_t *ctl) { return ctl ? ml_effective_pending(ctl) : 0; }

PyObject *ml_class_for(int64_t pending)
{
    if (pending & ML_REASON_MEMORY) return ml_exc_memory;
    if (pending & ML_REASON_ALLOCATIONS) return ml_exc_allocations;
    return ml_exc_token;
}

static PyThreadState *current_tstate(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyThreadState_GetUnchecked();
#else
    return _PyThreadState_UncheckedGet();
#endif
}

/* Whether ts is raising or handling (in an except or finally block) an
 * exception of class cls, other than `ignore`: the walk of
 * _PyErr_GetTopmostException, without a reference or an allocation (usable
 * from hooks). */
static int handling(PyThreadState *ts, PyObject *cls, PyObject *ignore)
{
    /* In flight: raised and unwinding towards its handler (samples go on
     * while its traceback grows).  Armed now, a second one would land at the
     * handler's first instruction -- or, out of an inner handler, in the
     * outer one. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *cur = ts->current_exception;
    if (cur != NULL && cur != ignore && PyObject_TypeCheck(cur, (PyTypeObject *)cls)) return 1;
#else
    PyObject *cur = ts->curexc_type;
    if (cur != NULL && PyType_Check(cur) && (ts->curexc_value == NULL || ts->curexc_value != ignore) &&
        PyType_IsSubtype((PyTypeObject *)cur, (PyTypeObject *)cls))
        return 1;
#endif
    for (_PyErr_StackItem *ei = ts->exc_info; ei != NULL; ei = ei->previous_item) {
        PyObject *v = ei->exc_value;
        if (v == NULL || v == Py_None || v == ignore) continue;
        return PyObject_TypeCheck(v, (PyTypeObject *)cls);
    }
    return 0;
}

/* The one-cause rule for an arm of ctl's thread ts with class cls
 * (ml_ctl_t.armed_class ...).  `same_thread`: ts is the calling thread (its
 * count is ml_allocated()); `sampled`: the arm comes from a sample, which
 * may be anywhere (even inside PyTraceBack_Here).  Returns 1 if refused. */
static int held(ml_ctl_t *ctl, PyThreadState *ts, PyObject *cls, PyObject *ignore,
                int same_thread, int sampled)
{
    int64_t now = same_thread ? ml_allocated() : 0;
    if (handling(ts, cls, ignore)) {
        /* Not again inside its own handler -- within bounds. */
        int expired = same_thread ? now >= ctl->grace_until
                                  : ++ctl->handler_rounds > ML_HANDLER_ROUNDS;
        if (!expired) {
            ctl->deferred++;
            return 1;
        }
        return 0;
    }
    if (!same_thread) ctl->handler_rounds = 0;
    if (sampled && cls == (PyObject *)ctl->hold_class && now < ctl->hold_until) {
        ctl->deferred++;
        return 1;
    }
    return 0;
}

/* quiet_call: an instance of `type` is being created on ctl's thread; if it
 * is the interrupt armed there, start the hold and the grace. */
void ml_interrupt_created(ml_ctl_t *ctl, PyTypeObject *type)
{
    PyObject *armed = (PyObject *)ctl->armed_class;
    if (armed == NULL || !PyType_Check(armed) || !PyType_IsSubtype(type, (PyTypeObject *)armed))
        return;
    ctl->armed_class = NULL;
    int64_t now = ml_allocated();
    ctl->hold_class = armed;
    ctl->hold_until = now > INT64_MAX - ML_REDELIVER_HOLD ? INT64_MAX : now + ML_REDELIVER_HOLD;
    ctl->grace_until = now > INT64_MAX - ML_HANDLER_GRACE ? INT64_MAX : now + ML_HANDLER_GRACE;
}

PyObject *ml_armed_exception(void)
{
    PyThreadState *ts = current_tstate();
    if (ts == NULL) return NULL;
#if PY_VERSION_HEX >= 0x030D0000
    return __atomic_load_n(&ts->async_exc, __ATOMIC_SEQ_CST);
#else
    return ts->async_exc;
#endif
}

PyObject *ml_take_armed_exception(void)
{
    PyThreadState *ts = current_tstate();
    if (ts == NULL) return NULL;
#if PY_VERSION_HEX >= 0x030D0000
    return __atomic_exchange_n(&ts->async_exc, NULL, __ATOMIC_SEQ_CST);
#else
    /* Reached when no call delivered it: another thread's delivery already
     * cleared the interpreter-wide flag, so there is nothing to unsignal. */
    PyObject *exc = ts->async_exc;
    ts->async_exc = NULL;
    return exc;
#endif
}

static int arm_current_thread(ml_ctl_t *ctl, int64_t pending, PyObject *ignore, int sampled)
{
    PyObject *cls = ml_class_for(pending);
    PyThreadState *ts = current_tstate();
    if (cls == NULL || ts == NULL) return 0;
    if (ts->interp != PyInterpreterState_Main()) {
        /* A subinterpreter running on this thread (inside the task): our
         * classes are the main interpreter's.  Armed when it returns. */
        ctl->deferred++;
        return 0;
    }
    if (held(ctl, ts, cls, ignore, 1, sampled)) return 0;
#if PY_VERSION_HEX >= 0x030D0000
    if (ts->async_exc == NULL) {
        Py_INCREF(cls);
        __atomic_store_n(&ts->async_exc, cls, __ATOMIC_SEQ_CST);
    }
    __atomic_fetch_or(&ts->eval_breaker, (uintptr_t)1 << 3, __ATOMIC_SEQ_CST);
#else
    if (ts->async_exc == NULL) {
        Py_INCREF(cls);
        ts->async_exc = cls;
    }
    _PyEval_SignalAsyncExc(ts->interp);
#endif
    ctl->armed_class = cls;
    ctl->arms++;
    return 1;
}

int ml_arm_current(ml_ctl_t *ctl, int64_t pending) { return arm_current_thread(ctl, pending, NULL, 0); }
int ml_arm_current_ignoring(ml_ctl_t *ctl, int64_t pending, PyObject *ignore)
{
    return arm_current_thread(ctl, pending, ignore, 0);
}

#define ML_BIG_ALLOC ((int64_t)1 << 20)
/* ------------------------------------------------------------------------ */
/* The slow path: runs when the countdown went below zero, or for a block of
 * ML_BIG_ALLOC bytes or more. */
static void __attribute__((noinline)) slow_path(void *ptr, int64_t n, int domain, int fresh)
{
    ml_tls_t *t = &T;
    int gil_held = domain != ML_DOMAIN_RAW;
    if (t->state != 1) {
        if (t->state == 2 || !g_started) {       /* exiting thread, or stopping */
            t->countdown = t->period = INT64_MAX / 4;
            t->consumed = 0;
            return;
        }
        ensure_registered(t);
    }
    int64_t allocated = allocated_now(t);
    if (t->epoch != g_epoch) reseed(t, allocated - n);
    int sampled = 0;
    while (t->next_sample < allocated) {
        sampled++;
        t->samples++;
        if (t->rec_buf && t->rec_n < t->rec_len) t->rec_buf[t->rec_n++] = t->next_sample;
        t->next_sample += draw_gap(t);
    }
    if (sampled) {
        const ml_observer_t *o = g_observer;
        if (o != NULL) o->on_sample(ptr, (size_t)n, sampled, domain);
    }
    ml_ctl_t *ctl = t->ctl;
    if (allocated > t->budget_end) {
        t->budget_end = ML_NO_BUDGET;
        if (ctl) {
            __atomic_fetch_or(&ctl->pending, ML_REASON_ALLOCATIONS, __ATOMIC_SEQ_CST);
            ml_pending_changed();
        }
    }
    int64_t limit = g_global_limit;
    int watched = ctl && ctl->watch_global > 0 && limit >= 0;
    /* A new block (not a realloc, whose old pages are already resident). */
    int big = fresh && n >= ML_BIG_ALLOC;
    if ((watched || g_track_rss) &&
        (big || (sampled && allocated - t->last_rss_check >= g_rss_interval))) {
        t->last_rss_check = allocated;
        /* A big block is charged in full before its pages are touched: the
         * RSS read now does not contain it yet, and the task may not sample
         * again (b"x" * 800 MiB, np.ones(10**8)). */
        int64_t rss = read_rss();
        int64_t would_be = big ? rss + n : rss;
        if (watched && would_be > limit && !ctl->memory_quiet) {
            __atomic_store_n(&g_over_rss, rss, __ATOMIC_RELAXED);
            __atomic_store_n(&g_over_block, big ? n : 0, __ATOMIC_RELAXED);
            __atomic_fetch_or(&ctl->pending, ML_REASON_MEMORY, __ATOMIC_SEQ_CST);
            ml_pending_changed();
        }
    }
    reset_countdown(t, allocated);
    if (ctl) ctl->slow_paths++;
    if (ctl && ctl->active > 0) {
        int64_t pending = ml_effective_pending(ctl);
        if (pending) {
            if (ctl->mask_depth > 0) {
                ctl->deferred++;
            } else if (gil_held) {
                arm_current_thread(ctl, pending, NULL, 1);
            } else {
                /* RAW hook: no GIL.  Come back at the next allocation. */
                t->period = t->countdown = 0;
            }
        }
    }
}

/* A new big block for a task watched by the global memory limit, which the
 * process cannot hold within it (RSS + block > limit): refused before it is
 * allocated -- the caller raises MemoryError, as on a machine out of memory --
 * and the task's interrupt wanted for memory.  Charged after the allocation
 * (slow_path), the block was already there: b"x" * n and np.ones(n) touch
 * every page before Python runs again, so the process went past its limit
 * (and a Dask worker past the nanny's, which kills it) before the interrupt
 * could land.  Not while masked (the library's bookkeeping and a task's
 * release code must not fail), nor for a task whose value is being dropped
 * (memory_quiet).  The refused bytes are not counted: nothing was given.
 * Returns 1 if refused.  RAW and NumPy hooks may run without the GIL: then
 * the next allocation arms, as in slow_path.  Reads only the caller's own
 * control block (its owner thread). */
static int __attribute__((noinline)) refuse_big_block(size_t n, int domain)
{
    ml_tls_t *t = &T;
    ml_ctl_t *ctl = t->ctl;
    int64_t limit = g_global_limit;
    if (ctl == NULL || limit < 0 || !g_started || t->state == 2 || ctl->watch_global <= 0 ||
        ctl->active <= 0 || ctl->mask_depth > 0 || ctl->memory_quiet)
        return 0;
    int64_t rss = read_rss();
    if (rss < 0 || (uint64_t)rss + n <= (uint64_t)limit) return 0;
    __atomic_store_n(&g_over_rss, rss, __ATOMIC_RELAXED);
    __atomic_store_n(&g_over_block, n > INT64_MAX ? INT64_MAX : (int64_t)n, __ATOMIC_RELAXED);
    __atomic_fetch_add(&g_refused_blocks, 1, __ATOMIC_RELAXED);
    __atomic_fetch_or(&ctl->pending, ML_REASON_MEMORY, __ATOMIC_SEQ_CST);
    ml_pending_changed();
    int64_t pending = ml_effective_pending(ctl);
    if (pending) {
        if (domain != ML_DOMAIN_RAW) {
            arm_current_thread(ctl, pending, NULL, 1);
        } else if (t->state == 1) {   /* no GIL: come back at the next allocation */
            t->consumed = allocated_now(t);
            t->period = t->countdown = 0;
        }
    }
    return 1;
}
#define ML_REFUSED(n, domain) \
    (__builtin_expect((int64_t)(n) >= ML_BIG_ALLOC, 0) && refuse_big_block((n), (domain)))

/* Blocks of ML_BIG_ALLOC bytes or more always take the slow path, where a
 * watched global memory limit is checked against the RSS plus the block. */
#define ML_COUNT(p, n, domain)                                                  \
    do {                                                                        \
        if (__builtin_expect((T.countdown -= (int64_t)(n)) < 0, 0) ||           \
            __builtin_expect((int64_t)(n) >= ML_BIG_ALLOC, 0))                  \
            slow_path((p), (int64_t)(n), (domain), 1);                          \
    } while (0)
/* realloc: counted, sampled; growing a block is not checked as a new big
 * block (its old pages are resident, its old size unknown).  A realloc of
 * NULL is a new block and checked as one (bytearray(n) allocates so). */
#define ML_COUNT_REALLOC(old, p, n, domain)                                     \
    do {                                                                        \
        if ((old) == NULL)                                                      \
            ML_COUNT((p), (n), (domain));                                       \
        else if (__builtin_expect((T.countdown -= (int64_t)(n)) < 0, 0))        \
            slow_path((p), (int64_t)(n), (domain), 0);                          \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Hooks.  ctx is the original allocator's ctx (see header comment).
 *
 * Fast path (no sample, no budget end, not a big block): take the bytes off
 * the countdown and call the original allocator.  Otherwise the slow variant
 * allocates first and counts after, so that slow_path() sees the block (the
 * profiler records it).  A request that fails on the fast path was counted
 * ("bytes requested").
 *
 * Both paths mark the call (T.reentrant): whatever the OBJ/MEM allocator
 * itself asks of the RAW one is its own business, not the program's request.
 * pymalloc hands requests of 0 or > 512 bytes to PyMem_RawMalloc (counted
 * once, here), and it grows its own bookkeeping there when it maps a new
 * arena: its table of arenas (PyMem_RawRealloc, as the heap grows past its
 * previous peak) and a leaf of its radix tree of arenas (PyMem_RawCalloc of
 * 128 KiB on 64-bit, the first time an arena lands in a 16 GiB region of the
 * address space: where mmap puts it depends on ASLR).  Counted, the same
 * cell counted 131072 bytes more in one fresh kernel in a few dozen.  The
 * mark costs the tail call: ~4 instructions per allocation (callgrind,
 * benchmarks/RESULTS.md). */
#define ML_FAST_SIZE(n) ((size_t)(n) < (size_t)ML_BIG_ALLOC)
static void *__attribute__((noinline)) obj_malloc_slow(void *ctx, size_t n)
{
    if (ML_REFUSED(n, ML_DOMAIN_OBJ)) return NULL;
    T.reentrant++;
    void *p = g_orig_obj.malloc(ctx, n);
    T.reentrant--;
    if (p) ML_COUNT(p, n, ML_DOMAIN_OBJ);
    return p;
}
static void *h_obj_malloc(void *ctx, size_t n)
{
    if (__builtin_expect(ML_FAST_SIZE(n), 1)) {
        int64_t left = T.countdown - (int64_t)n;
        if (__builtin_expect(left >= 0, 1)) {
            T.countdown = left;
            T.reentrant++;
            void *p = g_orig_obj.malloc(ctx, n);
            T.reentrant--;
            return p;
        }
    }
    return obj_malloc_slow(ctx, n);
}
static void *__attribute__((noinline)) obj_calloc_slow(void *ctx, size_t nelem, size_t elsize)
{
    if (ML_REFUSED(nelem * elsize, ML_DOMAIN_OBJ)) return NULL;
    T.reentrant++;
    void *p = g_orig_obj.calloc(ctx, nelem, elsize);
    T.reentrant--;
    if (p) ML_COUNT(p, nelem * elsize, ML_DOMAIN_OBJ);
    return p;
}
static void *h_obj_calloc(void *ctx, size_t nelem, size_t elsize)
{
    size_t n = nelem * elsize;
    if (__builtin_expect(ML_FAST_SIZE(n), 1)) {
        int64_t left = T.countdown - (int64_t)n;
        if (__builtin_expect(left >= 0, 1)) {
            T.countdown = left;
            T.reentrant++;
            void *p = g_orig_obj.calloc(ctx, nelem, elsize);
            T.reentrant--;
            return p;
        }
    }
    return obj_calloc_slow(ctx, nelem, elsize);
}
static void *__attribute__((noinline)) mem_malloc_slow(void *ctx, size_t n)
{
    if (ML_REFUSED(n, ML_DOMAIN_MEM)) return NULL;
    T.reentrant++;
    void *p = g_orig_mem.malloc(ctx, n);
    T.reentrant--;
    if (p) ML_COUNT(p, n, ML_DOMAIN_MEM);
    return p;
}
static void *h_mem_malloc(void *ctx, size_t n)
{
    if (__builtin_expect(ML_FAST_SIZE(n), 1)) {
        int64_t left = T.countdown - (int64_t)n;
        if (__builtin_expect(left >= 0, 1)) {
            T.countdown = left;
            T.reentrant++;
            void *p = g_orig_mem.malloc(ctx, n);
            T.reentrant--;
            return p;
        }
    }
    return mem_malloc_slow(ctx, n);
}
static void *__attribute__((noinline)) mem_calloc_slow(void *ctx, size_t nelem, size_t elsize)
{
    if (ML_REFUSED(nelem * elsize, ML_DOMAIN_MEM)) return NULL;
    T.reentrant++;
    void *p = g_orig_mem.calloc(ctx, nelem, elsize);
    T.reentrant--;
    if (p) ML_COUNT(p, nelem * elsize, ML_DOMAIN_MEM);
    return p;
}
static void *h_mem_calloc(void *ctx, size_t nelem, size_t elsize)
{
    size_t n = nelem * elsize;
    if (__builtin_expect(ML_FAST_SIZE(n), 1)) {
        int64_t left = T.countdown - (int64_t)n;
        if (__builtin_expect(left >= 0, 1)) {
            T.countdown = left;
            T.reentrant++;
            void *p = g_orig_mem.calloc(ctx, nelem, elsize);
            T.reentrant--;
            return p;
        }
    }
    return mem_calloc_slow(ctx, nelem, elsize);
}
static void *h_obj_realloc(void *ctx, void *ptr, size_t n)
{
    if (ptr == NULL && ML_REFUSED(n, ML_DOMAIN_OBJ)) return NULL;
    T.reentrant++;
    ML_ON_FREE(ptr);
    void *p = g_orig_obj.realloc(ctx, ptr, n);
    T.reentrant--;
    if (p) ML_COUNT_REALLOC(ptr, p, n, ML_DOMAIN_OBJ);
    return p;
}
static void *h_mem_realloc(void *ctx, void *ptr, size_t n)
{
    if (ptr == NULL && ML_REFUSED(n, ML_DOMAIN_MEM)) return NULL;
    T.reentrant++;
    ML_ON_FREE(ptr);
    void *p = g_orig_mem.realloc(ctx, ptr, n);
    T.reentrant--;
    if (p) ML_COUNT_REALLOC(ptr, p, n, ML_DOMAIN_MEM);
    return p;
}
static void *__attribute__((noinline)) raw_malloc_slow(void *ctx, size_t n)
{
    if (ML_REFUSED(n, ML_DOMAIN_RAW)) return NULL;
    void *p = g_orig_raw.malloc(ctx, n);
    if (p) ML_COUNT(p, n, ML_DOMAIN_RAW);
    return p;
}
static void *h_raw_malloc(void *ctx, size_t n)
{
    if (T.reentrant) return g_orig_raw.malloc(ctx, n);
    int64_t left = T.countdown - (int64_t)n;
    if (__builtin_expect(left >= 0 && (int64_t)n < ML_BIG_ALLOC, 1)) {
        T.countdown = left;
        return g_orig_raw.malloc(ctx, n);
    }
    return raw_malloc_slow(ctx, n);
}
static void *__attribute__((noinline)) raw_calloc_slow(void *ctx, size_t nelem, size_t elsize)
{
    if (ML_REFUSED(nelem * elsize, ML_DOMAIN_RAW)) return NULL;
    void *p = g_orig_raw.calloc(ctx, nelem, elsize);
    if (p) ML_COUNT(p, nelem * elsize, ML_DOMAIN_RAW);
    return p;
}
static void *h_raw_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (T.reentrant) return g_orig_raw.calloc(ctx, nelem, elsize);
    int64_t left = T.countdown - (int64_t)(nelem * elsize);
    if (__builtin_expect(left >= 0 && (int64_t)(nelem * elsize) < ML_BIG_ALLOC, 1)) {
        T.countdown = left;
        return g_orig_raw.calloc(ctx, nelem, elsize);
    }
    return raw_calloc_slow(ctx, nelem, elsize);
}
static void *h_raw_realloc(void *ctx, void *ptr, size_t n)
{
    if (ptr == NULL && !T.reentrant && ML_REFUSED(n, ML_DOMAIN_RAW)) return NULL;
    if (!T.reentrant) ML_ON_FREE(ptr);
    void *p = g_orig_raw.realloc(ctx, ptr, n);
    if (p && !T.reentrant) ML_COUNT_REALLOC(ptr, p, n, ML_DOMAIN_RAW);
    return p;
}

/* NumPy array buffers.  NumPy (>= 1.22) allocates array data through a
 * PyDataMem_Handler whose default allocator calls malloc directly, invisible
 * to the PyMem hooks: an `np.ones(10**9)` loop would allocate gigabytes
 * between two samples.  We count those bytes too by patching the function
 * pointers of NumPy's *default* handler in place (reached through the public
 * PyDataMem_DefaultHandler capsule; the struct is writable static data), so
 * that every thread is covered -- PyDataMem_SetHandler would only cover the
 * calling thread's context.  free is left alone.  Buffers may be allocated
 * without the GIL (counted like RAW).  Layout (numpy/ndarraytypes.h, stable
 * since 1.22, version 1): */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} ml_np_allocator_t;
typedef struct {
    char name[127];
    uint8_t version;
    ml_np_allocator_t allocator;
} ml_np_handler_t;

static ml_np_handler_t *g_np_handler;   /* GIL + g_lock */
static ml_np_allocator_t g_np_orig;     /* set before patching, never changed after */

/* NumPy >= 2.5's default handler allocates through PyMem_RawMalloc (2.4 and
 * older: malloc): the reentrancy guard keeps h_raw_* from counting the same
 * buffer a second time. */
static void *np_malloc(void *ctx, size_t n)
{
    if (ML_REFUSED(n, ML_DOMAIN_RAW)) return NULL;
    T.reentrant++;
    void *p = g_np_orig.malloc(ctx, n);
    T.reentrant--;
    if (p) ML_COUNT(p, n, ML_DOMAIN_RAW);
    return p;
}
static void *np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (ML_REFUSED(nelem * elsize, ML_DOMAIN_RAW)) return NULL;
    T.reentrant++;
    void *p = g_np_orig.calloc(ctx, nelem, elsize);
    T.reentrant--;
    if (p) ML_COUNT(p, nelem * elsize, ML_DOMAIN_RAW);
    return p;
}
static void *np_realloc(void *ctx, void *ptr, size_t n)
{
    if (ptr == NULL && ML_REFUSED(n, ML_DOMAIN_RAW)) return NULL;
    T.reentrant++;
    void *p = g_np_orig.realloc(ctx, ptr, n);
    T.reentrant--;
    if (p) ML_COUNT_REALLOC(ptr, p, n, ML_DOMAIN_RAW);
    return p;
}

/* [GIL] Patch NumPy's default handler (its address, from the capsule).
 * Returns 1 if patched now, 0 if already, -1 if the layout is unknown. */
PyAPI_FUNC(int) ml_numpy_patch(void *handler)
{
    ml_np_handler_t *h = (ml_np_handler_t *)handler;
    int rc;
    pthread_mutex_lock(&g_lock);
    if (g_np_handler != NULL) {
        rc = 0;
    } else if (h->version != 1 || strncmp(h->name, "default_allocator", sizeof h->name) != 0) {
        rc = -1;
    } else {
        if (g_np_orig.malloc == NULL) g_np_orig = h->allocator;
        g_np_handler = h;
        __atomic_store_n(&h->allocator.malloc, np_malloc, __ATOMIC_SEQ_CST);
        __atomic_store_n(&h->allocator.calloc, np_calloc, __ATOMIC_SEQ_CST);
        __atomic_store_n(&h->allocator.realloc, np_realloc, __ATOMIC_SEQ_CST);
        rc = 1;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static void numpy_unpatch_unlocked(void)
{
    ml_np_handler_t *h = g_np_handler;
    if (h == NULL) return;
    __atomic_store_n(&h->allocator.malloc, g_np_orig.malloc, __ATOMIC_SEQ_CST);
    __atomic_store_n(&h->allocator.calloc, g_np_orig.calloc, __ATOMIC_SEQ_CST);
    __atomic_store_n(&h->allocator.realloc, g_np_orig.realloc, __ATOMIC_SEQ_CST);
    g_np_handler = NULL;
}

int ml_numpy_patched(void) { return g_np_handler != NULL; }

int64_t ml_registered_threads(void)
{
    int64_t n = 0;
    pthread_mutex_lock(&g_registry_lock);
    for (ml_tls_t *t = g_registry; t; t = t->next) n++;
    pthread_mutex_unlock(&g_registry_lock);
    return n;
}

/* Free hooks: installed only while the profiler tracks sampled blocks
 * (ml_set_track_frees), so that frees cost nothing otherwise. */
static void h_obj_free(void *ctx, void *ptr)
{
    ML_ON_FREE(ptr);
    g_orig_obj.free(ctx, ptr);
}
static void h_mem_free(void *ctx, void *ptr)
{
    ML_ON_FREE(ptr);
    g_orig_mem.free(ctx, ptr);
}
static void h_raw_free(void *ctx, void *ptr)
{
    if (!T.reentrant) ML_ON_FREE(ptr);
    g_orig_raw.free(ctx, ptr);
}

/* ------------------------------------------------------------------------ */
/* Life cycle. */
static int set_rate_unlocked(double rate)
{
    if (!(rate > 0.0 && rate <= 1.0)) return ML_ERR_RATE;
    g_rate = rate;
    g_log1m_rate = rate >= 1.0 ? -INFINITY : log1p(-rate);
    g_rss_interval = rate <= ML_DEFAULT_RATE * 1.000001 ? 0 : (int64_t)(1.0 / ML_DEFAULT_RATE);
    return ML_OK;
}

static void reset_registered_threads(void)
{
    pthread_mutex_lock(&g_registry_lock);
    for (ml_tls_t *t = g_registry; t; t = t->next) {
        t->countdown = t->period = t->consumed = 0;
        t->samples = 0;
        t->last_rss_check = 0;
        t->budget_end = ML_NO_BUDGET;
        t->epoch = 0;
    }
    pthread_mutex_unlock(&g_registry_lock);
}

int ml_start(double sampling_rate, uint64_t seed)
{
    int rc = ML_OK;
    pthread_once(&g_once, once_init);
    PyGILState_STATE gs = PyGILState_Ensure();
    pthread_mutex_lock(&g_lock);
    if (g_started) { rc = ML_ERR_ALREADY_STARTED; goto out; }
    if ((rc = set_rate_unlocked(sampling_rate)) != ML_OK) goto out;
    g_seed = seed;
    g_epoch++;
    __atomic_store_n(&g_thread_ordinal, 0, __ATOMIC_RELAXED);
    reset_registered_threads();
    /* The calling thread is thread 0 of the new epoch: reproducible samples. */
    ensure_registered(&T);
    T.countdown = T.period = T.consumed = 0;
    T.budget_end = ML_NO_BUDGET;
    reseed(&T, 0);
    reset_countdown(&T, 0);

    PyMem_GetAllocator(PYMEM_DOMAIN_RAW, &g_orig_raw);
    PyMem_GetAllocator(PYMEM_DOMAIN_MEM, &g_orig_mem);
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &g_orig_obj);
    g_hook_raw = (PyMemAllocatorEx){g_orig_raw.ctx, h_raw_malloc, h_raw_calloc, h_raw_realloc,
                                    g_orig_raw.free};
    g_hook_mem = (PyMemAllocatorEx){g_orig_mem.ctx, h_mem_malloc, h_mem_calloc, h_mem_realloc,
                                    g_orig_mem.free};
    g_hook_obj = (PyMemAllocatorEx){g_orig_obj.ctx, h_obj_malloc, h_obj_calloc, h_obj_realloc,
                                    g_orig_obj.free};
    g_started = 1;
    PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &g_hook_raw);
    PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &g_hook_mem);
    PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &g_hook_obj);
out:
    pthread_mutex_unlock(&g_lock);
    PyGILState_Release(gs);
    return rc;
}

int ml_stop(void)
{
    int rc = ML_OK;
    PyMemAllocatorEx cur[3];
    PyGILState_STATE gs = PyGILState_Ensure();
    pthread_mutex_lock(&g_lock);
    if (!g_started) { rc = ML_ERR_NOT_STARTED; goto out; }
    PyMem_GetAllocator(PYMEM_DOMAIN_RAW, &cur[0]);
    PyMem_GetAllocator(PYMEM_DOMAIN_MEM, &cur[1]);
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &cur[2]);
    if (cur[0].malloc != h_raw_malloc || cur[1].malloc != h_mem_malloc ||
        cur[2].malloc != h_obj_malloc) {
        rc = ML_ERR_NOT_ON_TOP;
        goto out;
    }
    PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &g_orig_raw);
    PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &g_orig_mem);
    PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &g_orig_obj);
    g_track_frees = 0;
    if (g_observer != NULL && g_observer->on_engine_stop != NULL) g_observer->on_engine_stop();
    numpy_unpatch_unlocked();
    g_started = 0;
out:
    pthread_mutex_unlock(&g_lock);
    PyGILState_Release(gs);
    return rc;
}

int ml_is_started(void) { return g_started; }

void ml_set_observer(const ml_observer_t *observer) { g_observer = observer; }

int ml_set_free_hooks(int on)
{
    int rc = ML_OK;
    PyMemAllocatorEx cur;
    PyGILState_STATE gs = PyGILState_Ensure();
    pthread_mutex_lock(&g_lock);
    if (!on) g_track_frees = 0;   /* (hooks left in place stay inert) */
    if (!g_started) { rc = ML_ERR_NOT_STARTED; goto out; }
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &cur);
    if (cur.malloc != h_obj_malloc) { rc = ML_ERR_NOT_ON_TOP; goto out; }
    if (on) g_track_frees = 1;
    g_hook_raw.free = on ? h_raw_free : g_orig_raw.free;
    g_hook_mem.free = on ? h_mem_free : g_orig_mem.free;
    g_hook_obj.free = on ? h_obj_free : g_orig_obj.free;
    PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &g_hook_raw);
    PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &g_hook_mem);
    PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &g_hook_obj);
out:
    pthread_mutex_unlock(&g_lock);
    PyGILState_Release(gs);
    return rc;
}
double ml_sampling_rate(void) { return g_rate; }

int ml_set_sampling_rate(double rate)
{
    /* Other threads pick the new rate up at their next sample; the calling
     * thread redraws now (gaps are memoryless: redrawing from here is unbiased). */
    PyGILState_STATE gs = PyGILState_Ensure();
    pthread_mutex_lock(&g_lock);
    int rc = set_rate_unlocked(rate);
    if (rc == ML_OK && g_started && T.state == 1 && T.epoch == g_epoch) {
        int64_t now = allocated_now(&T);
        T.next_sample = now + draw_gap(&T) - 1;
        reset_countdown(&T, now);
    }
    pthread_mutex_unlock(&g_lock);
    PyGILState_Release(gs);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Current-thread accessors (no GIL needed: they touch only our TLS). */
static void ensure_live(ml_tls_t *t)
{
    pthread_once(&g_once, once_init);
    if (t->state == 0 && g_started) ensure_registered(t);
    if (t->state == 1 && t->epoch != g_epoch && g_started) {
        reseed(t, allocated_now(t));
        reset_countdown(t, allocated_now(t));
    }
}

int64_t ml_allocated(void)
{
    ensure_live(&T);
    return T.state == 1 ? allocated_now(&T) : 0;
}

int64_t ml_samples(void) { return T.samples; }

void ml_set_budget_end(int64_t end)
{
    ensure_live(&T);
    T.budget_end = end;
    if (T.state == 1) reset_countdown(&T, allocated_now(&T));
}

int64_t ml_budget_end(void) { return T.budget_end; }

void ml_set_ctl(ml_ctl_t *ctl) { T.ctl = ctl; }
ml_ctl_t *ml_get_ctl(void) { return T.ctl; }
void ml_detach_ctl(ml_ctl_t *ctl)
{
    if (T.ctl == ctl) T.ctl = NULL;
    /* A control block can die on another thread than its owner (a Python
     * object kept it alive past the owner's thread state: a kept scope, the
     * watchdog's list of states; a C thread that calls Python through
     * PyGILState_Ensure gets a new thread state each time): no registry entry
     * may point to it once it is freed (ml_any_pending walks them). */
    pthread_mutex_lock(&g_registry_lock);
    for (ml_tls_t *t = g_registry; t != NULL; t = t->next)
        if (t->ctl == ctl) t->ctl = NULL;
    pthread_mutex_unlock(&g_registry_lock);
}
void ml_ctl_add_pending(ml_ctl_t *ctl, int64_t bits)
{
    __atomic_fetch_or(&ctl->pending, bits, __ATOMIC_SEQ_CST);
    ml_pending_changed();
}

void ml_pending_changed(void) { __atomic_fetch_add(&g_pending_seq, 1, __ATOMIC_SEQ_CST); }

void ml_set_tasks_open(int64_t n)
{
    pthread_mutex_lock(&g_watch_lock);
    g_tasks_open = n;
    if (n > 0) pthread_cond_signal(&g_watch_cond);
    pthread_mutex_unlock(&g_watch_lock);
}

int ml_any_pending(void)
{
    int any = 0;
    pthread_mutex_lock(&g_registry_lock);
    for (ml_tls_t *t = g_registry; t != NULL && !any; t = t->next) {
        ml_ctl_t *ctl = t->ctl;
        if (ctl != NULL && ctl->active > 0 && ml_effective_pending(ctl)) any = 1;
    }
    pthread_mutex_unlock(&g_registry_lock);
    return any;
}

void ml_watch_restart(void) { g_watch_seen = -1; }

void ml_watch_sleep(int64_t interval_ns, int idle)
{
    for (;;) {
        if (idle) {
            /* No task open: nothing to re-deliver until one opens. */
            pthread_mutex_lock(&g_watch_lock);
            while (g_tasks_open <= 0) pthread_cond_wait(&g_watch_cond, &g_watch_lock);
            pthread_mutex_unlock(&g_watch_lock);
        }
        struct timespec ts = {interval_ns / 1000000000, interval_ns % 1000000000};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
        if (!idle || __atomic_load_n(&g_pending_seq, __ATOMIC_SEQ_CST) != g_watch_seen) break;
    }
    g_watch_seen = __atomic_load_n(&g_pending_seq, __ATOMIC_SEQ_CST);
}
void ml_ctl_clear_pending(ml_ctl_t *ctl, int64_t bits)
{
    __atomic_fetch_and(&ctl->pending, ~bits, __ATOMIC_SEQ_CST);
}

void ml_set_global_limit(int64_t bytes) { g_global_limit = bytes; }
int64_t ml_global_limit(void) { return g_global_limit; }
int64_t ml_rss(void)
{
    pthread_once(&g_once, once_init);
    return read_rss();
}
int64_t ml_peak_rss(void) { return __atomic_load_n(&g_peak_rss, __ATOMIC_RELAXED); }
void ml_reset_peak_rss(void) { __atomic_store_n(&g_peak_rss, 0, __ATOMIC_RELAXED); }
void ml_set_track_rss(int on) { g_track_rss = on; }
int64_t ml_over_rss(void) { return __atomic_load_n(&g_over_rss, __ATOMIC_RELAXED); }
int64_t ml_over_block(void) { return __atomic_load_n(&g_over_block, __ATOMIC_RELAXED); }
int64_t ml_refused_blocks(void) { return __atomic_load_n(&g_refused_blocks, __ATOMIC_RELAXED); }
int64_t ml_rss_reads(void) { return __atomic_load_n(&g_rss_reads, __ATOMIC_RELAXED); }

void ml_record_samples(int64_t *buf, int64_t n)
{
    T.rec_buf = buf;
    T.rec_len = buf ? n : 0;
    T.rec_n = 0;
}
int64_t ml_recorded_samples(void) { return T.rec_n; }

/* ------------------------------------------------------------------------ */
/* [GIL] functions, called through ctypes.PyDLL so that the GIL stays held:
 * each is atomic with respect to the bytecode of every thread. */

/* [GIL] Whether the calling thread runs the main interpreter: the globals
 * below hold its objects, and only it may set them. */
PyAPI_FUNC(int) ml_in_main_interpreter(void)
{
    return PyInterpreterState_Get() == PyInterpreterState_Main();
}

PyAPI_FUNC(int) ml_set_classes(PyObject *base, PyObject *memory, PyObject *allocations,
                               PyObject *token, PyObject *flush, PyObject *ensure_ctl,
                               PyObject *deliver, PyObject *after_fork)
{
    if (!ml_in_main_interpreter()) return -1;
    Py_INCREF(base); Py_INCREF(memory); Py_INCREF(allocations); Py_INCREF(token);
    Py_INCREF(flush); Py_INCREF(ensure_ctl); Py_INCREF(deliver); Py_INCREF(after_fork);
    ml_py_ensure_ctl = ensure_ctl;
    ml_py_deliver = deliver;
    ml_py_after_fork = after_fork;
    ml_exc_base = base;
    ml_exc_memory = memory;
    ml_exc_allocations = allocations;
    ml_exc_token = token;
    ml_py_flush = flush;
    return 0;
}

/* Arm ctl's thread (another thread) if an interrupt is pending, a task is
 * active and the thread is not masked.  Returns 1 if armed.  The check and
 * the arming happen under the GIL, so the target cannot enter a masked region
 * in between.  (The target's "already handling this cause" rule is applied
 * where it can be read safely: at its own samples, mask ends and in the
 * main-thread signal handler; see docs/design.md.) */
PyAPI_FUNC(int) ml_arm(ml_ctl_t *ctl)
{
    if (ctl == NULL || ctl->active <= 0) return 0;
    int64_t pending = ml_effective_pending(ctl);
    if (!pending) return 0;
    if (ctl->mask_depth > 0) {
        ctl->deferred++;
        return 0;
    }
    if (ctl->thread_id == PyThread_get_thread_ident())
        return arm_current_thread(ctl, pending, NULL, 0);
    /* The one-cause rule, as for the thread itself (arm_current_thread): not
     * while the thread handles an interrupt of this class -- the watchdog
     * would land it inside that handler.  The thread is not running (we hold
     * the GIL): its exception stack can be read. */
    PyObject *cls = ml_class_for(pending);
    for (PyThreadState *ts = PyInterpreterState_ThreadHead(PyInterpreterState_Main()); ts != NULL;
         ts = PyThreadState_Next(ts)) {
        if (ts->thread_id != ctl->thread_id) continue;
        if (held(ctl, ts, cls, NULL, 0, 0)) return 0;
        break;
    }
    if (PyThreadState_SetAsyncExc(ctl->thread_id, cls) != 1) return 0;
    ctl->armed_class = cls;
    ctl->arms++;
    return 1;
}

/* [GIL] The main thread's signal delivery raises `pending`'s interrupt itself
 * (_delivery.deliver_in_handler): it counts as armed for the one-cause rule. */
PyAPI_FUNC(void) ml_mark_armed(ml_ctl_t *ctl, int64_t pending)
{
    if (ctl != NULL) ctl->armed_class = ml_class_for(pending);
}

/* Is an asynchronous exception armed on the current thread?  (Tests.) */
PyAPI_FUNC(int) ml_async_exc_armed(void) { return ml_armed_exception() != NULL; }
