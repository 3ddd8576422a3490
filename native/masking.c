/* memprof-limits masking: regions where interrupts are deferred, entered
 * from C, and Python signal handlers that run to completion.
 *
 * The problem
 * -----------
 * Code that acquires and releases resources (a lock, the library's own scope
 * bookkeeping) must not be interrupted half-way, and the interrupt must not be
 * lost either.  Three kinds of asynchronous events can land at any bytecode
 * boundary: our own interrupt (armed by the sampler, ml_arm or the
 * main-thread signal), an exception raised by a Python signal handler
 * (KeyboardInterrupt from the default SIGINT handler, a user's SIGALRM
 * handler), and RecursionError at the recursion limit.
 *
 * What does not work, and why
 * ---------------------------
 * - A mask flag set by Python code: the event lands before the flag is set,
 *   at the function's first instruction.  So regions are entered from C: no
 *   bytecode runs between the caller and the region.
 * - Delivering an interrupt armed before the region by calling a Python
 *   no-op, and assuming what comes out is our interrupt: CPython runs pending
 *   signal handlers *before* the armed exception at the same check, so a
 *   handler's KeyboardInterrupt comes out first and our interrupt stays armed
 *   -- it then landed at the first instruction of `release` (a lock leaked,
 *   the scope's state half-closed), or, with the old code's NULL exception,
 *   crashed (PyException_SetContext(NULL, ...)).
 * - Letting Python signal handlers run inside a masked region: a handler that
 *   raises breaks the region exactly like an interrupt would; and a handler
 *   that starts while one of our interrupts is armed is itself interrupted at
 *   its first instruction (CPython clears the tripped flag first: the handler
 *   is lost).
 * - Calling these entry points through ctypes: near the recursion limit the
 *   argument conversion fails and ctypes wraps the RecursionError in an
 *   ArgumentError (3.11).  They are builtins (PyCFunction) instead.
 *
 * The solution
 * ------------
 * - mask_enter: raise the depth; on the outermost entry, grant recursion
 *   headroom (the region's bookkeeping never fails for lack of stack; taken
 *   back at the end, so user recursion still fails) and deliver whatever is
 *   armed by calling a Python no-op until nothing is armed: our interrupts
 *   are swallowed (sticky: their reason stays pending, re-armed at the end),
 *   anything else is kept and chained ("other").  Entering never leaves an
 *   exception set.
 * - mask_exit: lower the depth; on the outermost exit, take the headroom
 *   back, re-trip the signals deferred while masked (PyErr_SetInterruptEx),
 *   and re-arm a pending interrupt unless one is already propagating out of
 *   the region or the thread is already handling that cause.
 * - Python signal handlers are wrapped (_signals.py installs the wrappers):
 *   while masked, the wrapper only records the signal (re-tripped at the end
 *   of the region); otherwise it runs the handler masked -- to completion,
 *   like a finalizer -- then lets Python raise a pending interrupt at once
 *   (deliver_in_handler), so that a blocking call returns.
 *
 * Known failure cases
 * -------------------
 * - Handlers installed through the C API (PyOS_setsig) are not Python
 *   handlers and are not wrapped; neither are Python handlers installed with
 *   the private _signal module.
 * - A foreign asynchronous exception (PyThreadState_SetAsyncExc by someone
 *   else) found at entry is raised instead of entering (or after an exit).
 * - A masked region that runs away cannot be interrupted.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "internal.h"

/* Most deliveries attempted at one mask entry (each consumes one armed
 * exception or one pending signal that raises; more means a signal storm). */
#define ML_FLUSH_ROUNDS 16
/* Python frames (and 3.12+ C levels) granted to the outermost region. */
#define ML_HEADROOM 64

static int is_interrupt(PyObject *exc)
{
    return exc != NULL && ml_exc_base != NULL && PyObject_TypeCheck(exc, (PyTypeObject *)ml_exc_base);
}

/* Append `exc` (owned) to *chain: *chain becomes exc, with the old chain at
 * the end of exc's context chain (the later exception happened while the
 * earlier was pending).  Nothing is dropped; a cycle is never made. */
static void chain_other(PyObject **chain, PyObject *exc)
{
    if (exc == NULL) return;
    PyObject *old = *chain;
    *chain = exc;
    if (old == NULL || old == exc) {
        Py_XDECREF(old);
        return;
    }
    /* Walk exc's context chain (bounded); stop if old is already in it. */
    PyObject *tail = exc;
    Py_INCREF(tail);
    for (int i = 0; i < 100; i++) {
        PyObject *ctx = PyException_GetContext(tail);   /* new reference or NULL */
        if (ctx == NULL) break;
        Py_DECREF(tail);
        if (ctx == old) {  /* already chained */
            Py_DECREF(ctx);
            Py_DECREF(old);
            return;
        }
        tail = ctx;
    }
    PyException_SetContext(tail, old);   /* steals old */
    Py_DECREF(tail);
}

/* The version-specific recursion counters (cpython/pystate.h). */
static void grant_headroom(ml_ctl_t *ctl)
{
    PyThreadState *ts = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030C0000
    int py = ts->py_recursion_remaining, c = ts->c_recursion_remaining;
    ctl->headroom_py = py < ML_HEADROOM ? ML_HEADROOM - py : 0;
    ctl->headroom_c = c < ML_HEADROOM ? ML_HEADROOM - c : 0;
    ts->py_recursion_remaining += (int)ctl->headroom_py;
    ts->c_recursion_remaining += (int)ctl->headroom_c;
#else
    int py = ts->recursion_remaining;
    ctl->headroom_py = py < ML_HEADROOM ? ML_HEADROOM - py : 0;
    ctl->headroom_c = 0;
    ts->recursion_remaining += (int)ctl->headroom_py;
#endif
}

static void take_headroom_back(ml_ctl_t *ctl)
{
    PyThreadState *ts = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030C0000
    ts->py_recursion_remaining -= (int)ctl->headroom_py;
    ts->c_recursion_remaining -= (int)ctl->headroom_c;
#else
    ts->recursion_remaining -= (int)ctl->headroom_py;
#endif
    ctl->headroom_py = ctl->headroom_c = 0;
}

/* Enter a masked region.  Never leaves an exception set: anything other than
 * our interrupt that comes out while delivering what was armed is added to
 * *other (a new reference, or left NULL). */
static void mask_enter(ml_ctl_t *ctl, PyObject **other)
{
    if (ctl->mask_depth++ > 0) return;  /* nothing is armed while masked */
    grant_headroom(ctl);
    for (int i = 0; i < ML_FLUSH_ROUNDS && ml_armed_exception() != NULL; i++) {
        PyObject *r = PyObject_CallNoArgs(ml_py_flush);
        if (r != NULL) {
            Py_DECREF(r);
            continue;
        }
        PyObject *exc = PyErr_GetRaisedException();
        if (is_interrupt(exc)) {
            ctl->deferred++;
            Py_DECREF(exc);
        } else {
            chain_other(other, exc);
        }
    }
    /* Still armed (3.11/3.12: another thread's delivery cleared the
     * interpreter-wide flag, so no call delivers it): take it out here. */
    PyObject *cls = ml_take_armed_exception();
    if (cls != NULL) {
        if (PyType_Check(cls) && PyType_IsSubtype((PyTypeObject *)cls,
                                                  (PyTypeObject *)ml_exc_base)) {
            ctl->deferred++;
        } else {
            PyObject *exc = PyExceptionClass_Check(cls) ? PyObject_CallNoArgs(cls) : NULL;
            if (exc == NULL) exc = PyErr_GetRaisedException();
            chain_other(other, exc);
        }
        Py_DECREF(cls);
    }
}

/* Signals deferred while masked (ctl->deferred_signals, bit n-1 for signal
 * n) run at the next eval-breaker check after the region, through a pending
 * call that calls their installed handler -- the wrapper, which runs it
 * masked -- fetched with the builtin _signal.getsignal (no Python frame for
 * an armed interrupt to land in first).  Not PyErr_SetInterruptEx: that
 * writes the set_wakeup_fd a second time, and asyncio would run its
 * add_signal_handler callback twice. */
static uint64_t g_signals_to_run;   /* main thread, GIL */
static PyObject *g_getsignal;       /* _signal.getsignal; GIL, set once */

static int run_deferred_signals(void *unused)
{
    if (g_getsignal == NULL) {
        PyObject *mod = PyImport_ImportModule("_signal");
        g_getsignal = mod ? PyObject_GetAttrString(mod, "getsignal") : NULL;
        Py_XDECREF(mod);
        if (g_getsignal == NULL) return -1;
    }
    while (g_signals_to_run != 0) {
        int sig = __builtin_ctzll(g_signals_to_run) + 1;
        g_signals_to_run &= g_signals_to_run - 1;
        PyObject *handler = PyObject_CallFunction(g_getsignal, "i", sig);
        if (handler == NULL) return -1;
        PyObject *r = PyCallable_Check(handler)
                          ? PyObject_CallFunction(handler, "iO", sig, Py_None)
                          : Py_NewRef(Py_None);   /* SIG_DFL/SIG_IGN by now: as CPython */
        Py_DECREF(handler);
        if (r == NULL) {   /* a handler raised: the others run at the next check */
            if (g_signals_to_run) Py_AddPendingCall(run_deferred_signals, NULL);
            return -1;
        }
        Py_DECREF(r);
    }
    return 0;
}

static void schedule_deferred_signals(ml_ctl_t *ctl)
{
    uint64_t sigs = ctl->deferred_signals;
    ctl->deferred_signals = 0;
    int was_empty = g_signals_to_run == 0;
    g_signals_to_run |= sigs;
    if (was_empty && Py_AddPendingCall(run_deferred_signals, NULL) < 0) {
        /* The queue is full: trip them again instead. */
        g_signals_to_run = 0;
        for (int sig = 1; sig <= 64; sig++)
            if (sigs & ((uint64_t)1 << (sig - 1))) PyErr_SetInterruptEx(sig);
    }
}

/* Leave it.  On the outermost exit: headroom back, deferred signals
 * re-tripped, and a pending interrupt re-armed -- unless one is propagating
 * out of the region (it would hit the first call of every `finally` on its
 * way out; samples and the watchdog re-deliver if it is swallowed) or the
 * thread is handling that cause (other than `ignore`, which the region
 * suppressed). */
static void mask_exit(ml_ctl_t *ctl, int propagating, PyObject *ignore)
{
    if (--ctl->mask_depth > 0) return;
    take_headroom_back(ctl);
    if (ctl->deferred_signals != 0) schedule_deferred_signals(ctl);
    if (ctl->active > 0 && !propagating) {
        int64_t pending = ml_effective_pending(ctl);
        if (pending) ml_arm_current_ignoring(ctl, pending, ignore);
    }
}

/* The current thread's ctl, created by Python if needed.  While a thread has
 * no ctl it runs no task, so nothing can interrupt it before this returns. */
static ml_ctl_t *current_ctl(void)
{
    ml_ctl_t *ctl = ml_get_ctl();
    if (ctl == NULL && ml_py_ensure_ctl != NULL) {
        PyObject *r = PyObject_CallNoArgs(ml_py_ensure_ctl);
        if (r == NULL) return NULL;
        Py_DECREF(r);
        ctl = ml_get_ctl();
    }
    if (ctl == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_SystemError, "memprof_limits: no control block for this thread");
    return ctl;
}

/* Raise `other` (owned, may be NULL) after a region: alone if nothing else
 * is set, else chained under the exception that is. */
static PyObject *finish(PyObject *r, PyObject *other)
{
    if (other == NULL) return r;
    if (r != NULL) {
        Py_DECREF(r);
        PyErr_SetRaisedException(other);
        return NULL;
    }
    PyObject *exc = PyErr_GetRaisedException();
    if (exc == NULL) {
        PyErr_SetRaisedException(other);
    } else {
        chain_other(&other, exc);   /* exc, with other as its context */
        PyErr_SetRaisedException(other);
    }
    return NULL;
}

/* fn(*args) masked.  `is_enter`: nothing is acquired yet, so something that
 * arrives while entering is raised instead of calling fn; otherwise (an
 * __exit__, a release, a signal handler) fn is called anyway and that
 * exception is raised afterwards.  `ev` (an __exit__'s exception, or NULL):
 * if it is an interrupt and fn does not suppress it, it goes on
 * propagating. */
static PyObject *masked_call(ml_ctl_t *ctl, PyObject *fn, PyObject *const *args, size_t nargs,
                             int is_enter, PyObject *ev, int rearm)
{
    PyObject *other = NULL, *r = NULL;
    mask_enter(ctl, &other);
    if (other == NULL || !is_enter) r = PyObject_Vectorcall(fn, args, nargs, NULL);
    int propagating, suppressed = 0;
    if (r == NULL) {
        propagating = PyErr_Occurred() ? PyErr_ExceptionMatches(ml_exc_base) : 0;
    } else if (ev != NULL && ev != Py_None) {
        int truth = PyObject_IsTrue(r);
        if (truth < 0) {
            Py_CLEAR(r);
            propagating = PyErr_ExceptionMatches(ml_exc_base);
        } else {
            suppressed = truth;
            propagating = is_interrupt(ev) && !truth;
        }
    } else {
        propagating = 0;
    }
    mask_exit(ctl, propagating || !rearm, suppressed ? ev : NULL);
    return finish(r, other);
}

/* quiet_call(fn, *args): fn(*args) masked, never re-armed at its end.  The
 * interrupt classes' __init__ (see _sampler.init_native): CPython creates
 * the instance where an interrupt lands -- and on 3.11 again when the bare
 * class is normalized -- by calling the class.  A Python __init__ is an
 * eval-breaker point, and samples go on while the exception is created and
 * unwinds: an interrupt re-armed then landed inside __init__ and replaced
 * the one being created (3.11: its traceback was one library frame, the
 * task's frames lost; 3.12+: nested __init__ calls, a RecursionError when
 * every byte is sampled).  Entered from C, the construction is masked from
 * its first instruction; what was armed meanwhile is ours and stays pending.
 * If it is the interrupt armed on the thread, the one-cause rule's hold
 * and grace start (ml_ctl_t.armed_class). */
static PyObject *b_quiet_call(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "quiet_call(fn, *args): fn is required");
        return NULL;
    }
    ml_ctl_t *ctl = ml_get_ctl();
    if (ctl == NULL)  /* this thread never ran a task: nothing to mask */
        return PyObject_Vectorcall(args[0], args + 1, (size_t)(nargs - 1), NULL);
    if (nargs >= 2) ml_interrupt_created(ctl, Py_TYPE(args[1]));
    return masked_call(ctl, args[0], args + 1, (size_t)(nargs - 1), 0, NULL, 0);
}

/* masked_call(fn, *args) */
static PyObject *b_masked_call(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "masked_call(fn, *args): fn is required");
        return NULL;
    }
    ml_ctl_t *ctl = current_ctl();
    if (ctl == NULL) return NULL;
    return masked_call(ctl, args[0], args + 1, (size_t)(nargs - 1), 1, NULL, 1);
}

/* Exact task boundaries (ml_ctl_t.entering/top): the count a task is
 * charged runs from here, right after its scope's bookkeeping returned, to
 * task_end, right before the exit bookkeeping is called.  No allocation. */
static void task_begin(ml_ctl_t *ctl)
{
    ml_marks_t *m = ctl->entering;
    if (m == NULL) return;
    ctl->entering = NULL;
    int64_t start = ml_allocated();
    m->start = start;
    m->task_end = start;
    if (m->limit >= 0) {
        m->end = m->limit > INT64_MAX - start ? INT64_MAX : start + m->limit;
        ml_set_budget_end(m->end < m->outer_end ? m->end : m->outer_end);
    }
    m->prev = ctl->top;
    ctl->top = m;
}

static void task_end(ml_ctl_t *ctl)
{
    if (ctl->top != NULL) ctl->top->task_end = ml_allocated();
}

/* The exception being handled (sys.exception()) is the same when a call
 * returns as when it started -- except after CPython 3.13.0's compiler bug:
 * the back edge of a loop that ends an `except` block is outside the block's
 * cleanup entry of the exception table, so an exception raised there (a
 * signal handler's, an interrupt: the eval breaker is checked at that
 * JUMP_BACKWARD) skips POP_EXCEPT and leaves the caught exception as the
 * thread's handled one for good, the __context__ of every later exception.
 * A task is a call: its end puts the caller's handled exception back.
 * Steals `handled`; touches no raised exception. */
static void restore_handled(PyObject *handled)
{
    if (handled == Py_None) Py_CLEAR(handled);
    PyObject *now = PyErr_GetHandledException();
    if (now == Py_None) Py_CLEAR(now);
    if (now != handled) PyErr_SetHandledException(handled);
    Py_XDECREF(now);
    Py_XDECREF(handled);
}

/* bracket(acquire, body, release): acquire() masked -> r; body(r) with the
 * caller's mask state -> v or exception e; release(r, v, e) masked -> the
 * result.  release runs iff acquire returned.  All the sequencing happens in
 * C: no bytecode boundary (hence no delivery point) between the calls. */
static PyObject *b_bracket(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "bracket(acquire, body, release)");
        return NULL;
    }
    PyObject *acquire = args[0], *body = args[1], *release = args[2];
    ml_ctl_t *ctl = current_ctl();
    if (ctl == NULL) return NULL;
    PyObject *other = NULL;
    mask_enter(ctl, &other);
    if (other != NULL) {  /* before anything was acquired */
        mask_exit(ctl, 0, NULL);
        PyErr_SetRaisedException(other);
        return NULL;
    }
    ctl->entering = NULL;
    PyObject *r = PyObject_CallNoArgs(acquire);
    if (r == NULL) {
        ctl->entering = NULL;
        mask_exit(ctl, PyErr_ExceptionMatches(ml_exc_base), NULL);
        return NULL;
    }
    task_begin(ctl);  /* (acquire was a scope's _ml_enter: its task starts here) */
    /* body runs with the caller's masking state (masked if nested in a
     * masked region).  Leaving the mask re-arms a deferred interrupt, which
     * then lands at body's first instruction, inside the bracket. */
    PyObject *handled = PyErr_GetHandledException();   /* new reference, or NULL */
    mask_exit(ctl, 0, NULL);
    PyObject *v = PyObject_CallOneArg(body, r);
    task_end(ctl);
    PyObject *exc = NULL;
    if (v == NULL) {
        exc = PyErr_GetRaisedException();
        if (exc == NULL) {
            PyErr_SetString(PyExc_SystemError, "memprof_limits: body failed without an exception");
            exc = PyErr_GetRaisedException();
        }
    }
    restore_handled(handled);
    mask_enter(ctl, &other);
    if (other != NULL) {
        /* Something else arrived right at the end of body: it is body's. */
        Py_CLEAR(v);
        if (exc != NULL) chain_other(&exc, other);
        else exc = other;
        other = NULL;
    }
    PyObject *result = PyObject_CallFunctionObjArgs(release, r, v ? v : Py_None,
                                                    exc ? exc : Py_None, NULL);
    Py_DECREF(r);
    Py_XDECREF(v);
    Py_XDECREF(exc);
    ctl->memory_quiet = 0;   /* the value of a task over the limit is gone */
    mask_exit(ctl, result == NULL && PyErr_ExceptionMatches(ml_exc_base), NULL);
    return result;
}

/* Context-manager trampolines: `__enter__ = instancemethod(tramp_enter)`
 * runs self._ml_enter() masked, `__exit__` runs self._ml_exit(et, ev, tb)
 * masked.  Being C functions, they are entered without a bytecode boundary:
 * an interrupt armed during the with-body cannot land between the with
 * statement and the masked region. */
static PyObject *call_method_masked(PyObject *self, const char *name, PyObject *const *args,
                                    size_t nargs, int is_enter, PyObject *ev)
{
    ml_ctl_t *ctl = current_ctl();
    if (ctl == NULL) return NULL;
    PyObject *fn = PyObject_GetAttrString(self, name);
    if (fn == NULL) return NULL;
    PyObject *r = masked_call(ctl, fn, args, nargs, is_enter, ev, 1);
    Py_DECREF(fn);
    return r;
}

static PyObject *b_tramp_enter(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "__enter__() takes no arguments");
        return NULL;
    }
    ml_ctl_t *ctl = current_ctl();
    if (ctl == NULL) return NULL;
    ctl->entering = NULL;
    PyObject *r = call_method_masked(args[0], "_ml_enter", NULL, 0, 1, NULL);
    if (r != NULL) task_begin(ctl);
    ctl->entering = NULL;
    return r;
}

static PyObject *b_tramp_exit(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "__exit__(exc_type, exc_value, traceback)");
        return NULL;
    }
    ml_ctl_t *ctl = current_ctl();
    if (ctl == NULL) return NULL;
    task_end(ctl);
    return call_method_masked(args[0], "_ml_exit", args + 1, 3, 0, args[2]);
}

/* The wrapper of a Python signal handler (m_self = the handler), called by
 * CPython with (signum, frame). */
static PyObject *b_signal_handler(PyObject *handler, PyObject *const *args, Py_ssize_t nargs)
{
    ml_ctl_t *ctl = ml_get_ctl();
    if (ctl == NULL) return PyObject_Vectorcall(handler, args, (size_t)nargs, NULL);
    if (ctl->mask_depth > 0 && nargs >= 1) {
        long sig = PyLong_AsLong(args[0]);
        if (sig >= 1 && sig <= 64) {
            ctl->deferred_signals |= (uint64_t)1 << (sig - 1);
            Py_RETURN_NONE;
        }
        PyErr_Clear();
    }
    /* Not re-armed at the end of the handler's region: deliver_in_handler
     * decides (an interrupt armed now would land at its first instruction,
     * before its checks). */
    PyObject *r = masked_call(ctl, handler, args, (size_t)nargs, 0, NULL, 0);
    if (r != NULL && ctl->active > 0 && ctl->mask_depth == 0 && ml_py_deliver != NULL) {
        /* Raise a pending interrupt now: a blocking call (time.sleep, a
         * socket read) that the signal woke then returns with it. */
        PyObject *d = PyObject_Vectorcall(ml_py_deliver, args + (nargs >= 2 ? 1 : nargs),
                                          nargs >= 2 ? 1 : 0, NULL);
        if (d == NULL) {
            Py_CLEAR(r);
            return NULL;
        }
        Py_DECREF(d);
    }
    /* Not raised (inside a finalizer, or that cause is being handled): armed
     * as at the end of any masked region, deferred, never dropped. */
    if (ctl->active > 0 && ctl->mask_depth == 0) {
        int64_t pending = ml_effective_pending(ctl);
        if (pending) ml_arm_current(ctl, pending);
    }
    return r;
}

static PyMethodDef g_signal_handler_def = {
    "memprof_limits_signal_handler", (PyCFunction)(void (*)(void))b_signal_handler,
    METH_FASTCALL,
    "A Python signal handler run to completion: masked, deferred while masked "
    "(memprof_limits._signals).  __self__ is the handler."};

/* wrap_signal_handler(handler) -> the wrapper (see above). */
static PyObject *b_wrap_signal_handler(PyObject *mod, PyObject *handler)
{
    return PyCFunction_New(&g_signal_handler_def, handler);
}

/* wrap_installed_handlers(): every Python handler installed now, wrapped
 * (_signals.install, once).  In C, because the handlers are not wrapped yet:
 * a pending one runs at the first bytecode boundary and may raise, and a
 * Python loop stopped half-way left SIGALRM's raising handler unwrapped for
 * good -- later it broke masked regions (a lock held, a scope left open).
 * No bytecode runs here; a signal that arrives meanwhile waits for the next
 * check, by then wrapped.  What the handlers of signals pending at our
 * explicit check (or at _signal.signal's own) raise is raised at the end,
 * chained, once every handler is wrapped.  Main thread only. */
static PyObject *b_wrap_installed_handlers(PyObject *mod, PyObject *unused)
{
    PyObject *sigmod = PyImport_ImportModule("_signal");
    if (sigmod == NULL) return NULL;
    PyObject *get = PyObject_GetAttrString(sigmod, "getsignal");
    PyObject *set = get ? PyObject_GetAttrString(sigmod, "signal") : NULL;
    Py_DECREF(sigmod);
    if (set == NULL) {
        Py_XDECREF(get);
        return NULL;
    }
    PyObject *raised = NULL;   /* what handlers raised meanwhile */
    for (int sig = 1; sig <= 64; sig++) {
        for (int round = 0; round < ML_FLUSH_ROUNDS; round++) {
            if (PyErr_CheckSignals() < 0) {   /* an unwrapped handler raised */
                chain_other(&raised, PyErr_GetRaisedException());
                continue;
            }
            PyObject *h = PyObject_CallFunction(get, "i", sig);
            if (h == NULL) {   /* not a valid signal number here */
                PyErr_Clear();
                break;
            }
            int todo = PyCallable_Check(h) && !(PyCFunction_Check(h) &&
                        ((PyCFunctionObject *)h)->m_ml == &g_signal_handler_def);
            PyObject *w = todo ? PyCFunction_New(&g_signal_handler_def, h) : NULL;
            Py_DECREF(h);
            if (!todo) break;
            PyObject *r = w ? PyObject_CallFunction(set, "iO", sig, w) : NULL;
            Py_XDECREF(w);
            if (r != NULL) {
                Py_DECREF(r);
                break;
            }
            /* Not settable (OSError, ValueError, RuntimeError): left as it is,
             * as signal.signal would.  Anything else is a handler's, run by
             * signal()'s own check for pending signals: wrapped next round. */
            if (PyErr_ExceptionMatches(PyExc_OSError) || PyErr_ExceptionMatches(PyExc_ValueError) ||
                PyErr_ExceptionMatches(PyExc_RuntimeError)) {
                PyErr_Clear();
                break;
            }
            chain_other(&raised, PyErr_GetRaisedException());
        }
    }
    Py_DECREF(get);
    Py_DECREF(set);
    if (raised != NULL) {
        PyErr_SetRaisedException(raised);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* os.register_at_fork(after_in_child=...): runs in the child, before any
 * Python code of ours; an interrupt armed in the parent just before the fork
 * is dropped (no limit of the parent applies), then Python resets its state. */
static PyObject *b_after_fork_child(PyObject *mod, PyObject *unused)
{
    for (int i = 0; i < ML_FLUSH_ROUNDS && ml_armed_exception() != NULL; i++) {
        PyObject *r = PyObject_CallNoArgs(ml_py_flush);
        if (r != NULL) {
            Py_DECREF(r);
            continue;
        }
        PyObject *exc = PyErr_GetRaisedException();
        if (!is_interrupt(exc)) {
            PyErr_SetRaisedException(exc);
            return NULL;
        }
        Py_DECREF(exc);
    }
    /* A fork during finalization (an atexit handler, a __del__ at exit): the
     * modules the Python side needs may be gone; the child has no task to
     * reset (the C side already cleared what the hooks read). */
    if (ml_py_after_fork == NULL || Py_IsFinalizing()) return Py_NewRef(Py_None);
    return PyObject_CallNoArgs(ml_py_after_fork);
}

/* Cyclic garbage collections run masked: finalizers (__del__, weakref
 * callbacks) and gc.callbacks run by the collector are not interrupted (an
 * exception there is only printed, and the unraisable hook that prints it
 * is Python code that would be interrupted in turn).  _delivery keeps
 * gc_first at the head of gc.callbacks and gc_last at its tail: CPython calls
 * them in list order, for "start" and for "stop".  ctl->gc_masked says the
 * region is open, so that a missing "stop" (our tail removed during the
 * collection) cannot unbalance the depth. */
static int phase_is(PyObject *phase, const char *name)
{
    return PyUnicode_Check(phase) && PyUnicode_CompareWithASCIIString(phase, name) == 0;
}

static PyObject *g_gc_first, *g_gc_last;   /* the gc_first/gc_last builtins (GIL; set once) */

/* Keep gc_first at the head of gc.callbacks and gc_last twice at its tail,
 * where they open the region before every other callback and end it after
 * every other one: a callback appended since (a library registering one
 * inside a task) would otherwise run unmasked at "stop"; one inserted at the
 * head runs unmasked in this collection only.  Twice, because CPython walks
 * the live list by index: a callback that removes itself makes the walk skip
 * the next entry -- a single gc_last behind it would be skipped and the
 * region left open.  Moves must not make the walk skip or repeat anyone:
 * during a collection gc_first is the callback running, at index `current`;
 * moving it to index 0 shifts only entries that already ran, and a gc_last
 * is moved only from behind it.  Outside a collection (current = -1: the
 * task's start), both are inserted if missing.  Returns whether gc_last is
 * in the list at all. */
static PyObject *g_gc_callbacks;  /* gc.callbacks (GIL; fetched once: CPython's collector
                                    keeps calling that list even if the attribute is rebound) */

static int gc_guard_callbacks(int in_collection)
{
    PyObject *cbs = g_gc_callbacks;
    if (cbs != NULL) {  /* the common case, at every collection: all in place */
        Py_ssize_t n = PyList_GET_SIZE(cbs);
        if (n >= 3 && PyList_GET_ITEM(cbs, 0) == g_gc_first &&
            PyList_GET_ITEM(cbs, n - 1) == g_gc_last && PyList_GET_ITEM(cbs, n - 2) == g_gc_last)
            return 1;
    }
    PyObject *saved = PyErr_GetRaisedException();  /* (none is expected) */
    if (cbs == NULL) {
        PyObject *name = PyUnicode_InternFromString("gc");
        PyObject *gc = name ? PyImport_GetModule(name) : NULL;
        Py_XDECREF(name);
        cbs = gc ? PyObject_GetAttrString(gc, "callbacks") : NULL;
        Py_XDECREF(gc);
        if (cbs != NULL && !PyList_Check(cbs)) Py_CLEAR(cbs);
        g_gc_callbacks = cbs;  /* (kept: a strong reference for good) */
    }
    int found = 0;
    if (cbs != NULL) {
        Py_ssize_t current = -1, n = PyList_GET_SIZE(cbs);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (PyList_GET_ITEM(cbs, i) == g_gc_first) {
                current = i;
                break;
            }
        }
        if (current > 0) {
            if (PyList_SetSlice(cbs, current, current + 1, NULL) == 0)
                PyList_Insert(cbs, 0, g_gc_first);
        } else if (current < 0 && !in_collection) {
            PyList_Insert(cbs, 0, g_gc_first);
            current = 0;
        }
        if (!in_collection) current = -1;  /* nothing ran: every entry may move */
        /* gc_last: removed from behind `current`, then appended twice. */
        int had = 0;
        for (Py_ssize_t i = PyList_GET_SIZE(cbs) - 1; i > current; i--) {
            if (PyList_GET_ITEM(cbs, i) != g_gc_last) continue;
            had = 1;
            if (PyList_SetSlice(cbs, i, i + 1, NULL) < 0) break;
        }
        if (had || !in_collection)
            found = PyList_Append(cbs, g_gc_last) == 0 && PyList_Append(cbs, g_gc_last) == 0;
    }
    PyErr_Clear();
    if (saved != NULL) PyErr_SetRaisedException(saved);
    return found;
}

static PyObject *b_gc_first(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    ml_ctl_t *ctl = ml_get_ctl();
    if (ctl == NULL || nargs < 1) Py_RETURN_NONE;
    int have_last = gc_guard_callbacks(1);
    int start = phase_is(args[0], "start");
    if (ctl->gc_masked && (start || !have_last)) {
        /* "stop" with gc_last gone: end the region here.  "start" with it
         * still open: the last collection's "stop" never reached gc_last
         * (gc.callbacks changed under it) -- end that one first. */
        ctl->gc_masked = 0;
        mask_exit(ctl, 0, NULL);
    }
    if (start) {
        PyObject *other = NULL;
        ctl->gc_masked = 1;
        mask_enter(ctl, &other);
        if (other != NULL) {  /* a foreign asynchronous exception: keep it visible */
            PyErr_SetRaisedException(other);
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* gc_guard(): put gc_first and gc_last in place (a task's start). */
static PyObject *b_gc_guard(PyObject *mod, PyObject *unused)
{
    gc_guard_callbacks(0);
    Py_RETURN_NONE;
}

static PyObject *b_gc_last(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    ml_ctl_t *ctl = ml_get_ctl();
    if (ctl != NULL && nargs >= 1 && ctl->gc_masked && phase_is(args[0], "stop")) {
        ctl->gc_masked = 0;
        mask_exit(ctl, 0, NULL);
    }
    Py_RETURN_NONE;
}

/* take_deferred_signals() -> int: the signals deferred so far in the current
 * masked region (bit n-1: signal n), forgotten: the caller runs them now (a
 * SafeMutex waiting masked, so that Ctrl+C can stop the wait). */
static PyObject *b_take_deferred_signals(PyObject *mod, PyObject *unused)
{
    ml_ctl_t *ctl = ml_get_ctl();
    uint64_t sigs = 0;
    if (ctl != NULL) {
        sigs = ctl->deferred_signals;
        ctl->deferred_signals = 0;
    }
    return PyLong_FromUnsignedLongLong(sigs);
}

static PyMethodDef g_builtins[] = {
    {"masked_call", (PyCFunction)(void (*)(void))b_masked_call, METH_FASTCALL,
     "masked_call(fn, *args): fn(*args) with interrupts deferred until it returns."},
    {"quiet_call", (PyCFunction)(void (*)(void))b_quiet_call, METH_FASTCALL,
     "quiet_call($module, fn, /, *args)\n--\n\nfn(*args) masked, not re-armed at its end."},
    {"bracket", (PyCFunction)(void (*)(void))b_bracket, METH_FASTCALL,
     "bracket(acquire, body, release): release(r, v, e) iff r = acquire() returned."},
    {"tramp_enter", (PyCFunction)(void (*)(void))b_tramp_enter, METH_FASTCALL,
     "self._ml_enter(), masked."},
    {"tramp_exit", (PyCFunction)(void (*)(void))b_tramp_exit, METH_FASTCALL,
     "self._ml_exit(et, ev, tb), masked."},
    {"wrap_signal_handler", b_wrap_signal_handler, METH_O,
     "The handler, run to completion (masked), deferred while masked."},
    {"after_fork_child", b_after_fork_child, METH_NOARGS, "Reset in a forked child."},
    {"gc_first", (PyCFunction)(void (*)(void))b_gc_first, METH_FASTCALL,
     "gc.callbacks head: a collection starts masked."},
    {"gc_last", (PyCFunction)(void (*)(void))b_gc_last, METH_FASTCALL,
     "gc.callbacks tail: the masked collection ends."},
    {"gc_guard", b_gc_guard, METH_NOARGS,
     "Put gc_first at the head of gc.callbacks and gc_last twice at its tail."},
    {"take_deferred_signals", b_take_deferred_signals, METH_NOARGS,
     "The signals deferred in this masked region, forgotten (bit n-1: signal n)."},
    {"wrap_installed_handlers", b_wrap_installed_handlers, METH_NOARGS,
     "Wrap every installed Python signal handler (main thread, no bytecode boundary)."},
    {NULL, NULL, 0, NULL},
};

/* [GIL] The builtins above, as a tuple in g_builtins order (created once). */
PyAPI_FUNC(PyObject *) ml_builtins(void)
{
    Py_ssize_t n = 0;
    while (g_builtins[n].ml_name != NULL) n++;
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyCFunction_New(&g_builtins[i], NULL);
        if (f == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        if (g_builtins[i].ml_meth == (PyCFunction)(void (*)(void))b_gc_last && g_gc_last == NULL)
            g_gc_last = Py_NewRef(f);
        if (g_builtins[i].ml_meth == (PyCFunction)(void (*)(void))b_gc_first && g_gc_first == NULL)
            g_gc_first = Py_NewRef(f);
        PyTuple_SET_ITEM(t, i, f);
    }
    return t;
}
