/* C API of memprof_limits._native_testing (fed to cffi's cdef). */
#ifndef MEMPROF_LIMITS_TESTING_H
#define MEMPROF_LIMITS_TESTING_H
#include <stddef.h>
#include <stdint.h>
/* CDEF-BEGIN */
#define MLT_RAW 0
#define MLT_MEM 1
#define MLT_OBJ 2
#define MLT_MALLOC 0
#define MLT_CALLOC 1
#define MLT_REALLOC 2
/* Bytes counted by `allocated` (pass ml_allocated) across one allocation of n
 * bytes (then, for MLT_REALLOC, a realloc to n2), measured in C. */
int64_t mlt_measure(int64_t (*allocated)(void), int domain, int kind, size_t n, size_t n2);
/* Bytes counted by `allocated` across `iterations` x (alloc n bytes, free),
 * measured in C.  RAW runs without the GIL (truly concurrent threads). */
int64_t mlt_measure_loop(int64_t (*allocated)(void), int domain, size_t n, int64_t iterations);
/* iterations x (alloc n bytes, free); returns how many were done. */
int64_t mlt_alloc_loop(int domain, size_t n, int64_t iterations);
/* Mean ns per malloc+free pair of n bytes in the domain, GIL held. */
double mlt_bench_ns(int domain, size_t n, int64_t iterations);
/* CDEF-END */
#endif
