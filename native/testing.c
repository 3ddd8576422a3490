/* Deterministic allocation helpers for the tests and the C micro-benchmark:
 * compiled as memprof_limits._native_testing, beside the sampler.  Each
 * function takes the GIL itself (cffi calls release it). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <time.h>

#include "testing.h"

static void *alloc_in(int domain, int kind, size_t n)
{
    switch (domain) {
    case MLT_RAW:
        return kind == MLT_CALLOC ? PyMem_RawCalloc(n, 1) : PyMem_RawMalloc(n);
    case MLT_MEM:
        return kind == MLT_CALLOC ? PyMem_Calloc(n, 1) : PyMem_Malloc(n);
    default:
        return kind == MLT_CALLOC ? PyObject_Calloc(n, 1) : PyObject_Malloc(n);
    }
}

static void *realloc_in(int domain, void *p, size_t n)
{
    switch (domain) {
    case MLT_RAW: return PyMem_RawRealloc(p, n);
    case MLT_MEM: return PyMem_Realloc(p, n);
    default: return PyObject_Realloc(p, n);
    }
}

static void free_in(int domain, void *p)
{
    switch (domain) {
    case MLT_RAW: PyMem_RawFree(p); break;
    case MLT_MEM: PyMem_Free(p); break;
    default: PyObject_Free(p);
    }
}

int64_t mlt_measure(int64_t (*allocated)(void), int domain, int kind, size_t n, size_t n2)
{
    PyGILState_STATE gs = PyGILState_Ensure();
    int64_t before = allocated();
    void *p = alloc_in(domain, kind, n);
    if (kind == MLT_REALLOC && p) p = realloc_in(domain, p, n2);
    int64_t after = allocated();
    free_in(domain, p);
    PyGILState_Release(gs);
    return p ? after - before : -1;
}

int64_t mlt_measure_loop(int64_t (*allocated)(void), int domain, size_t n, int64_t iterations)
{
    PyGILState_STATE gs = PyGILState_UNLOCKED;
    if (domain != MLT_RAW) gs = PyGILState_Ensure();
    int64_t before = allocated();
    for (int64_t i = 0; i < iterations; i++) {
        void *p = alloc_in(domain, MLT_MALLOC, n);
        free_in(domain, p);
    }
    int64_t after = allocated();
    if (domain != MLT_RAW) PyGILState_Release(gs);
    return after - before;
}

int64_t mlt_alloc_loop(int domain, size_t n, int64_t iterations)
{
    PyGILState_STATE gs = PyGILState_Ensure();
    int64_t done = 0;
    for (; done < iterations; done++) {
        void *p = alloc_in(domain, MLT_MALLOC, n);
        if (!p) break;
        free_in(domain, p);
    }
    PyGILState_Release(gs);
    return done;
}

double mlt_bench_ns(int domain, size_t n, int64_t iterations)
{
    struct timespec a, b;
    PyGILState_STATE gs = PyGILState_Ensure();
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int64_t i = 0; i < iterations; i++) {
        void *p = alloc_in(domain, MLT_MALLOC, n);
        __asm__ volatile("" : : "r"(p) : "memory");
        free_in(domain, p);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    PyGILState_Release(gs);
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (double)iterations;
}
