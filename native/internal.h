/* What sampler.c (the allocator hooks) and masking.c (the masked regions,
 * which call Python) share.  Not part of the Python-visible API. */
#ifndef MEMPROF_LIMITS_INTERNAL_H
#define MEMPROF_LIMITS_INTERNAL_H
#include <Python.h>
#include <stdint.h>

#include "sampler.h"

#if PY_VERSION_HEX < 0x030C0000
/* 3.12's single-object exception API, for 3.11. */
static inline PyObject *PyErr_GetRaisedException(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) PyException_SetTraceback(value, tb);
    Py_DECREF(type);
    Py_XDECREF(tb);
    return value;
}
static inline void PyErr_SetRaisedException(PyObject *exc)
{
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
}
#endif

#if PY_VERSION_HEX < 0x030D0000
#define Py_IsFinalizing _Py_IsFinalizing
#endif

/* Exception classes armed by the sampler, one per reason; strong references
 * set once with the GIL by ml_set_classes and never released.  g_exc_base is
 * memprof_limits.Interrupted. */
extern PyObject *ml_exc_base, *ml_exc_memory, *ml_exc_allocations, *ml_exc_token;
/* Python callables set with the classes (GIL): a no-op whose call delivers
 * an armed exception; one that gives the current thread a control block;
 * deliver_in_handler(frame), which raises a pending interrupt from a signal
 * handler; the Python side of the at-fork reset in a child. */
extern PyObject *ml_py_flush, *ml_py_ensure_ctl, *ml_py_deliver, *ml_py_after_fork;

/* The reasons pending for ctl: ctl->pending plus ML_REASON_TOKEN if a
 * watched token is set. */
int64_t ml_effective_pending(ml_ctl_t *ctl);
/* The class armed for `pending` (memory first, then allocations, token). */
PyObject *ml_class_for(int64_t pending);
/* Arm the current thread (GIL held) with the class for `pending`, unless it
 * is already handling an interrupt of that class (one cause is never
 * re-delivered inside its own except/finally).  Returns 1 if armed. */
int ml_arm_current(ml_ctl_t *ctl, int64_t pending);
/* The same, where the exception `ignore` does not count as handled (an
 * __exit__ that suppresses it). */
int ml_arm_current_ignoring(ml_ctl_t *ctl, int64_t pending, PyObject *ignore);
/* The current thread's async exception, if one is armed (GIL held). */
PyObject *ml_armed_exception(void);
/* Disarm it: the armed class (a new reference), or NULL. */
PyObject *ml_take_armed_exception(void);

/* quiet_call: an instance of `type` is being created on ctl's thread (the
 * one-cause rule's hold and grace start if it is the armed interrupt). */
void ml_interrupt_created(ml_ctl_t *ctl, PyTypeObject *type);

#endif
