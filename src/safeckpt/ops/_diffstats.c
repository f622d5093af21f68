/* _diffstats: the sums behind `safeckpt diff`, in one pass over both tensors.

   block_sums(a, kind_a, b, kind_b, tolerance) -> (finite, aa, bb, ab, dd, abs_sum, abs_max,
                                                    changed, nonfinite, beyond)

   `a` and `b` are C-contiguous buffers of the same number of elements (read-only is fine);
   `kind_*` says how to read them: "f64", "f32", "f16" or "bf16" (the 16-bit ones passed as
   their bits). Every value is widened to float64 exactly, then, over the pairs where both
   values are finite:
       finite   the number of such pairs        aa, bb, ab, dd   sum a*a, b*b, a*b, d*d (d = a-b)
       abs_sum  sum |d|                         abs_max          max |d|
       changed  pairs with d != 0               beyond           pairs with |d| > atol + rtol*|a|
   and over the others, nonfinite: the pairs that do not match (a match is two NaNs, whatever
   their bits, or the same infinity). `tolerance` is None or (atol, rtol); beyond is 0 without it.

   This is the numpy path of safeckpt/ops/diff_sums.py fused into one loop: numpy needs about
   nine passes over float64 copies of the data, which made diff CPU-bound. Results agree with
   numpy's to rounding of the sums: values are summed in eight independent accumulators over
   chunks of CHUNK pairs (the chunk totals then added in order), so the error is a few ulps
   per chunk rather than per element. A chunk with a NaN, an infinity or a square that
   overflows is summed again pair by pair on the careful path. The GIL is released throughout,
   so the threads of safeckpt.ops.diff run this on every core.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define CHUNK 512 /* pairs; a multiple of the eight lanes */

typedef struct {
    int64_t finite, changed, nonfinite, beyond;
    double aa, bb, ab, dd, abs_sum, abs_max;
} sums_t;

typedef struct {
    int given;
    double atol, rtol;
} tolerance_t;

/* --- reading one value as float64 (all exact) ----------------------------------------- */

static inline double from_f64(const void *p, Py_ssize_t i) { return ((const double *)p)[i]; }

static inline double from_f32(const void *p, Py_ssize_t i) { return (double)((const float *)p)[i]; }

static inline double from_bf16(const void *p, Py_ssize_t i) {
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16; /* bf16 is the top half of an f32 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

static inline double from_f16(const void *p, Py_ssize_t i) {
    uint16_t h = ((const uint16_t *)p)[i];
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2**-24, exact in float */
        float magnitude = (float)mantissa * 0x1p-24f;
        return sign ? -(double)magnitude : (double)magnitude;
    }
    /* normal: rebias the exponent (15 -> 127); inf and NaN: the all-ones exponent */
    uint32_t bits = sign | (exponent == 0x1f ? 0x7f800000u : (exponent + 112) << 23) | mantissa << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

/* --- the careful path: one pair at a time, non-finite values set aside -------------- */

static inline void add_pair(sums_t *s, double a, double b, const tolerance_t *tol) {
    if (!isfinite(a) || !isfinite(b)) {
        if (!((isnan(a) && isnan(b)) || a == b))
            s->nonfinite++;
        return;
    }
    double d = a - b, m = fabs(d);
    s->finite++;
    s->aa += a * a;
    s->bb += b * b;
    s->ab += a * b;
    s->dd += d * d;
    s->abs_sum += m;
    if (m > s->abs_max)
        s->abs_max = m;
    s->changed += d != 0;
    if (tol->given)
        s->beyond += m > tol->atol + tol->rtol * fabs(a);
}

static void add_chunk(sums_t *total, const sums_t *chunk) {
    total->finite += chunk->finite;
    total->changed += chunk->changed;
    total->nonfinite += chunk->nonfinite;
    total->beyond += chunk->beyond;
    total->aa += chunk->aa;
    total->bb += chunk->bb;
    total->ab += chunk->ab;
    total->dd += chunk->dd;
    total->abs_sum += chunk->abs_sum;
    if (chunk->abs_max > total->abs_max)
        total->abs_max = chunk->abs_max;
}

/* --- the fast path: a chunk in vector accumulators, no branches in the loop --------- */

/* GCC and Clang vector extensions, two doubles wide: SSE2 on every x86-64, NEON on arm64. */
typedef double v2d __attribute__((vector_size(16)));
typedef int64_t v2l __attribute__((vector_size(16)));

/* Eight values from index i, widened to float64, as four pairs: out[k] holds i+2k, i+2k+1.
   SSE2 (every x86-64) widens four at a time; elsewhere one at a time. */
static inline void load8_f64(const void *p, Py_ssize_t i, v2d out[4]) {
    memcpy(out, (const double *)p + i, 4 * sizeof(v2d));
}

#if defined(__SSE2__)
static inline void widen_f32x4(__m128 f, v2d *out) {
    out[0] = (v2d)_mm_cvtps_pd(f);
    out[1] = (v2d)_mm_cvtps_pd(_mm_movehl_ps(f, f));
}

static inline void load8_f32(const void *p, Py_ssize_t i, v2d out[4]) {
    const float *f = (const float *)p + i;
    widen_f32x4(_mm_loadu_ps(f), out);
    widen_f32x4(_mm_loadu_ps(f + 4), out + 2);
}

static inline void load8_bf16(const void *p, Py_ssize_t i, v2d out[4]) {
    /* bf16 is the top half of an f32: interleaving zeros below each value makes the f32s */
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)), zero = _mm_setzero_si128();
    widen_f32x4(_mm_castsi128_ps(_mm_unpacklo_epi16(zero, h)), out);
    widen_f32x4(_mm_castsi128_ps(_mm_unpackhi_epi16(zero, h)), out + 2);
}
#else
static inline void load8_f32(const void *p, Py_ssize_t i, v2d out[4]) {
    for (int k = 0; k < 4; k++)
        out[k] = (v2d){from_f32(p, i + 2 * k), from_f32(p, i + 2 * k + 1)};
}

static inline void load8_bf16(const void *p, Py_ssize_t i, v2d out[4]) {
    for (int k = 0; k < 4; k++)
        out[k] = (v2d){from_bf16(p, i + 2 * k), from_bf16(p, i + 2 * k + 1)};
}
#endif

static inline void load8_f16(const void *p, Py_ssize_t i, v2d out[4]) {
    for (int k = 0; k < 4; k++)
        out[k] = (v2d){from_f16(p, i + 2 * k), from_f16(p, i + 2 * k + 1)};
}

static inline v2d vabs(v2d x) { return (v2d)((v2l)x & INT64_MAX); }

static inline v2d vmax(v2d x, v2d y) { /* only ever given numbers: NaN chunks are redone */
#if defined(__SSE2__)
    return (v2d)_mm_max_pd((__m128d)x, (__m128d)y);
#else
    v2l bigger = x > y;
    return (v2d)(((v2l)x & bigger) | ((v2l)y & ~bigger));
#endif
}

static inline double hsum(v2d v) { return v[0] + v[1]; }

static inline double hmax(v2d v) { return v[0] > v[1] ? v[0] : v[1]; }

static inline int64_t hcount(v2l v) { return -(v[0] + v[1]); } /* a true comparison is -1 */

/* One set of lanes: two pairs a step. */
#define STEP(SET)                                                                                \
    do {                                                                                         \
        v2d a = va[SET], b = vb[SET], d = a - b, m = vabs(d);                                    \
        aa[SET] += a * a;                                                                        \
        bb[SET] += b * b;                                                                        \
        ab[SET] += a * b;                                                                        \
        dd[SET] += d * d;                                                                        \
        abs_sum[SET] += m;                                                                       \
        abs_max[SET] = vmax(m, abs_max[SET]);                                                    \
        changed[SET] += d != 0;                                                                  \
        if (with_tolerance)                                                                      \
            beyond[SET] += m > atol + rtol * vabs(a);                                            \
    } while (0)

/* A chunk's sums in four sets of two lanes (eight pairs a step), so that consecutive
   additions do not wait on each other; `with_tolerance` is a constant where it is inlined. */
#define DEFINE_CHUNK(NAME, KA, KB)                                                               \
    static inline Py_ssize_t NAME(const void *pa, const void *pb, Py_ssize_t start,              \
                                  Py_ssize_t len, const int with_tolerance, double atol,         \
                                  double rtol, sums_t *chunk) {                                  \
        Py_ssize_t whole = len - len % 8;                                                        \
        v2d aa[4] = {{0}}, bb[4] = {{0}}, ab[4] = {{0}}, dd[4] = {{0}};                          \
        v2d abs_sum[4] = {{0}}, abs_max[4] = {{0}};                                              \
        v2l changed[4] = {{0}}, beyond[4] = {{0}};                                               \
        for (Py_ssize_t i = start; i < start + whole; i += 8) {                                  \
            v2d va[4], vb[4];                                                                    \
            load8_##KA(pa, i, va);                                                               \
            load8_##KB(pb, i, vb);                                                               \
            STEP(0);                                                                             \
            STEP(1);                                                                             \
            STEP(2);                                                                             \
            STEP(3);                                                                             \
        }                                                                                        \
        *chunk = (sums_t){0};                                                                    \
        chunk->finite = whole;                                                                   \
        for (int k = 0; k < 4; k++) {                                                            \
            chunk->aa += hsum(aa[k]);                                                            \
            chunk->bb += hsum(bb[k]);                                                            \
            chunk->ab += hsum(ab[k]);                                                            \
            chunk->dd += hsum(dd[k]);                                                            \
            chunk->abs_sum += hsum(abs_sum[k]);                                                  \
            chunk->abs_max = hmax(vmax(abs_max[k], (v2d){chunk->abs_max, chunk->abs_max}));      \
            chunk->changed += hcount(changed[k]);                                                \
            chunk->beyond += hcount(beyond[k]);                                                  \
        }                                                                                        \
        return whole;                                                                            \
    }

#define DEFINE_SUMS(NAME, KA, KB)                                                                \
    DEFINE_CHUNK(NAME##_chunk, KA, KB)                                                           \
    static void NAME(const void *pa, const void *pb, Py_ssize_t n, const tolerance_t *tol,       \
                     sums_t *total) {                                                            \
        for (Py_ssize_t start = 0; start < n; start += CHUNK) {                                  \
            Py_ssize_t len = n - start < CHUNK ? n - start : CHUNK;                              \
            sums_t chunk;                                                                        \
            Py_ssize_t whole = tol->given                                                        \
                ? NAME##_chunk(pa, pb, start, len, 1, tol->atol, tol->rtol, &chunk)              \
                : NAME##_chunk(pa, pb, start, len, 0, 0.0, 0.0, &chunk);                         \
            /* NaN or inf anywhere (or a square past DBL_MAX) shows in these sums */             \
            if (!isfinite(chunk.aa + chunk.bb + chunk.dd + chunk.abs_sum)) {                     \
                memset(&chunk, 0, sizeof chunk);                                                 \
                whole = 0;                                                                       \
            }                                                                                    \
            for (Py_ssize_t i = start + whole; i < start + len; i++)                             \
                add_pair(&chunk, from_##KA(pa, i), from_##KB(pb, i), tol);                       \
            add_chunk(total, &chunk);                                                            \
        }                                                                                        \
    }

#define DEFINE_ROW(A)                                                                            \
    DEFINE_SUMS(sums_##A##_f64, A, f64)                                                          \
    DEFINE_SUMS(sums_##A##_f32, A, f32)                                                          \
    DEFINE_SUMS(sums_##A##_f16, A, f16)                                                          \
    DEFINE_SUMS(sums_##A##_bf16, A, bf16)

DEFINE_ROW(f64)
DEFINE_ROW(f32)
DEFINE_ROW(f16)
DEFINE_ROW(bf16)

typedef void (*sums_fn)(const void *, const void *, Py_ssize_t, const tolerance_t *, sums_t *);

static const char *const KINDS[] = {"f64", "f32", "f16", "bf16"};
static const Py_ssize_t ITEMSIZE[] = {8, 4, 2, 2};
static const sums_fn TABLE[4][4] = {
    {sums_f64_f64, sums_f64_f32, sums_f64_f16, sums_f64_bf16},
    {sums_f32_f64, sums_f32_f32, sums_f32_f16, sums_f32_bf16},
    {sums_f16_f64, sums_f16_f32, sums_f16_f16, sums_f16_bf16},
    {sums_bf16_f64, sums_bf16_f32, sums_bf16_f16, sums_bf16_bf16},
};

/* --- the Python function ------------------------------------------------------------- */

static int kind_index(const char *kind) {
    for (int k = 0; k < 4; k++)
        if (strcmp(kind, KINDS[k]) == 0)
            return k;
    PyErr_Format(PyExc_ValueError, "unknown kind '%s': use f64, f32, f16 or bf16", kind);
    return -1;
}

static PyObject *block_sums(PyObject *self, PyObject *args) {
    Py_buffer a, b;
    const char *kind_a, *kind_b;
    PyObject *tolerance;
    if (!PyArg_ParseTuple(args, "y*sy*sO", &a, &kind_a, &b, &kind_b, &tolerance))
        return NULL;
    PyObject *result = NULL;
    tolerance_t tol = {0, 0.0, 0.0};
    int ka = kind_index(kind_a), kb = ka < 0 ? -1 : kind_index(kind_b);
    if (kb < 0)
        goto done;
    if (tolerance != Py_None) {
        if (!PyArg_ParseTuple(tolerance, "dd", &tol.atol, &tol.rtol))
            goto done;
        tol.given = 1;
    }
    if (a.len % ITEMSIZE[ka] || b.len % ITEMSIZE[kb] || a.len / ITEMSIZE[ka] != b.len / ITEMSIZE[kb]) {
        PyErr_SetString(PyExc_ValueError, "a and b must hold the same number of whole values");
        goto done;
    }
    sums_t s = {0};
    Py_ssize_t n = a.len / ITEMSIZE[ka];
    Py_BEGIN_ALLOW_THREADS
    TABLE[ka][kb](a.buf, b.buf, n, &tol, &s);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(LddddddLLL)", (long long)s.finite, s.aa, s.bb, s.ab, s.dd, s.abs_sum,
                           s.abs_max, (long long)s.changed, (long long)s.nonfinite, (long long)s.beyond);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

static PyMethodDef METHODS[] = {
    {"block_sums", block_sums, METH_VARARGS,
     "block_sums(a, kind_a, b, kind_b, tolerance) -> (finite, aa, bb, ab, dd, abs_sum, abs_max, "
     "changed, nonfinite, beyond): the diff sums of two buffers in one pass (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_diffstats",
                                    "The sums behind safeckpt diff, in one pass.", -1, METHODS};

PyMODINIT_FUNC PyInit__diffstats(void) { return PyModule_Create(&MODULE); }
