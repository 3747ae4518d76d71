/* Giving back the pages of Python's empty small-object pools (atrium.observability.pools).
 *
 * CPython's small-object allocator (pymalloc) carves 1 MiB arenas into 16 KiB pools and returns an
 * arena to the system only once every pool in it is empty. After thousands of connections close,
 * most of the arenas they needed stay: a few objects allocated meanwhile that live on (a timer, a
 * cached header, a pooled database connection) hold each of them, and their empty pools stay
 * resident. This module
 *
 * - installs an arena allocator (PyObject_SetArenaAllocator, public C API) that maps arenas as
 *   CPython's own does (mmap) and remembers them, and
 * - purge(): for every empty pool of those arenas, tells the kernel (madvise MADV_DONTNEED) that
 *   all of the pool but its first page may be dropped, and marks the pool's size class unknown
 *   (DUMMY_SIZE_IDX) so that pymalloc initialises it afresh when it next uses it: its old list of
 *   free blocks lived in the pages given back. The first page stays: it holds the pool's header,
 *   which links the arena's list of free pools. In a pool in use, the pages past its last live
 *   block go the same way (give_back_tail).
 *
 * The pool header's layout is CPython's (Objects/obmalloc.c, unchanged from 3.10 to 3.13); the
 * Python side (pools.py) installs this only on those versions, with pymalloc in use. A region is
 * purged only when it was allocated with the arena size given to install() and every pool header
 * in it is consistent with one arena. Everything runs with the GIL held, as pymalloc does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct pool_header {
    union { void *_padding; unsigned int count; } ref;
    void *freeblock;
    struct pool_header *nextpool;
    struct pool_header *prevpool;
    unsigned int arenaindex;
    unsigned int szidx;
    unsigned int nextoffset;
    unsigned int maxnextoffset;
} pool_header;

/* Exported by CPython (Objects/obmalloc.c: what sys._debugmallocstats prints), declared in no public header. */
extern int _PyObject_DebugMallocStats(FILE *out);

#define POOLS_PER_ARENA 64   /* 1 MiB / 16 KiB with the radix tree, 256 KiB / 4 KiB without */
#define SIZE_CLASSES 64      /* at most 512 / 8 */
#define DUMMY_SIZE_IDX 0xffff

static void **arenas = NULL;
static size_t narenas = 0, capacity = 0, arena_size = 0;

static void *map(size_t size) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void *arena_alloc(void *ctx, size_t size) {
    void *p = map(size);
    if (p == NULL || size != arena_size) {
        return p;  /* not an arena (CPython also maps its frames' stack chunks here) */
    }
    if (narenas == capacity) {
        size_t grown = capacity ? capacity * 2 : 256;
        void **more = realloc(arenas, grown * sizeof(void *));
        if (more == NULL) {
            return p;  /* simply not tracked: never purged */
        }
        arenas = more;
        capacity = grown;
    }
    arenas[narenas++] = p;
    return p;
}

static void arena_free(void *ctx, void *ptr, size_t size) {
    if (size == arena_size) {
        for (size_t i = 0; i < narenas; i++) {
            if (arenas[i] == ptr) {
                arenas[i] = arenas[--narenas];
                break;
            }
        }
    }
    munmap(ptr, size);
}

/* The arena size of this build, as pymalloc's own statistics print it ("N arenas * S bytes/arena"), or 0. */
static size_t configured_arena_size(void) {
    char *text = NULL;
    size_t length = 0, size = 0;
    FILE *out = open_memstream(&text, &length);
    if (out == NULL) {
        return 0;
    }
    int printed = _PyObject_DebugMallocStats(out);
    fclose(out);
    if (printed && text != NULL) {
        for (char *line = text; line != NULL && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
            unsigned long arenas, bytes;
            if (sscanf(line, "%lu arenas * %lu bytes/arena", &arenas, &bytes) == 2) {
                size = bytes;
                break;
            }
        }
    }
    free(text);
    return size;
}

static PyObject *install(PyObject *self, PyObject *noargs) {
    if (arena_size != 0) {
        return PyLong_FromSize_t(arena_size);
    }
    size_t size = configured_arena_size(), pool = size / POOLS_PER_ARENA;
    if (pool == 0 || (pool & (pool - 1)) != 0 || size % POOLS_PER_ARENA != 0) {
        return PyLong_FromSize_t(0);  /* no pymalloc, or not laid out as expected: nothing installed */
    }
    arena_size = size;
    PyObjectArenaAllocator allocator = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&allocator);
    return PyLong_FromSize_t(arena_size);
}

static int initialised(const pool_header *h) { return h->nextoffset != 0; }

/* Whether every initialised pool of the region at base looks like one of pymalloc's, in one arena. */
static int is_arena(uintptr_t first, uintptr_t end, size_t pool) {
    int seen = 0;
    unsigned int index = 0;
    for (uintptr_t p = first; p + pool <= end; p += pool) {
        const pool_header *h = (const pool_header *)p;
        if (!initialised(h)) {
            continue;
        }
        if (h->nextoffset > pool || h->maxnextoffset > pool
                || (h->szidx >= SIZE_CLASSES && h->szidx != DUMMY_SIZE_IDX)) {
            return 0;
        }
        if (seen && h->arenaindex != index) {
            return 0;
        }
        seen = 1;
        index = h->arenaindex;
    }
    return 1;
}

#if SIZEOF_VOID_P > 4
#define ALIGNMENT 16
#else
#define ALIGNMENT 8
#endif
#define POOL_OVERHEAD ((sizeof(pool_header) + ALIGNMENT - 1) & ~(size_t)(ALIGNMENT - 1))
#define MAX_BLOCKS (16384 / ALIGNMENT)

/* In a pool in use, the pages past its last live block, when its free blocks reach them: the free
 * blocks from there on leave the pool's free list and become uncarved again (nextoffset, as if the
 * pool had never been filled that far), so that nothing lives in the pages given back and pymalloc
 * carves them afresh. The pool is left alone unless its header, free list and count agree. Returns
 * the bytes given back. */
static size_t give_back_tail(uintptr_t p, size_t pool, size_t page) {
    pool_header *h = (pool_header *)p;
    size_t size = pool - h->maxnextoffset;
    if (h->freeblock == NULL || size < ALIGNMENT || size > 512 || size % ALIGNMENT != 0
            || h->nextoffset < POOL_OVERHEAD || (h->nextoffset - POOL_OVERHEAD) % size != 0) {
        return 0;  /* full (no free block), or not laid out as expected */
    }
    size_t carved = (h->nextoffset - POOL_OVERHEAD) / size, nfree = 0;
    if (carved > MAX_BLOCKS) {
        return 0;
    }
    unsigned char free_block[MAX_BLOCKS] = {0};
    for (void *b = h->freeblock; b != NULL; b = *(void **)b) {
        uintptr_t offset = (uintptr_t)b - p;
        if ((uintptr_t)b < p || offset < POOL_OVERHEAD || offset >= h->nextoffset
                || (offset - POOL_OVERHEAD) % size != 0 || ++nfree > carved) {
            return 0;
        }
        size_t index = (offset - POOL_OVERHEAD) / size;
        if (free_block[index]) {
            return 0;
        }
        free_block[index] = 1;
    }
    if (carved - nfree != h->ref.count) {
        return 0;
    }
    size_t live_end = 0;  /* blocks [0, live_end) hold the last live one */
    for (size_t index = carved; index > 0; index--) {
        if (!free_block[index - 1]) {
            live_end = index;
            break;
        }
    }
    uintptr_t tail = p + POOL_OVERHEAD + live_end * size;  /* the first block that stays uncarved */
    uintptr_t from = (tail + page - 1) & ~(uintptr_t)(page - 1);
    if (live_end == carved || from >= p + pool) {
        return 0;
    }
    /* First the free list without the blocks from tail on (read before their pages go: the list
     * runs through them), then the pages. Were madvise to fail, the pool would still be sound. */
    void **link = &h->freeblock;
    for (void *b = h->freeblock, *next; b != NULL; b = next) {
        next = *(void **)b;
        if ((uintptr_t)b < tail) {
            *link = b;
            link = (void **)b;
        }
    }
    *link = NULL;
    h->nextoffset = (unsigned int)(tail - p);
    int given = madvise((void *)from, p + pool - from, MADV_DONTNEED) == 0;
    if (h->freeblock == NULL) {  /* every free block was in the tail: carve one, as pymalloc does */
        h->freeblock = (void *)tail;
        *(void **)tail = NULL;
        h->nextoffset += (unsigned int)size;
    }
    if (!given) {
        return 0;
    }
    return p + pool - from;
}

static PyObject *purge(PyObject *self, PyObject *noargs) {
    long page = sysconf(_SC_PAGESIZE);
    size_t pool = arena_size / POOLS_PER_ARENA, given = 0, pools = 0, tails = 0;
    if (arena_size == 0 || page <= 0 || pool <= (size_t)page) {
        return Py_BuildValue("nnn", (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0);
    }
    for (size_t i = 0; i < narenas; i++) {
        uintptr_t base = (uintptr_t)arenas[i], end = base + arena_size;
        uintptr_t first = (base + pool - 1) & ~(uintptr_t)(pool - 1);
        if (!is_arena(first, end, pool)) {
            continue;
        }
        for (uintptr_t p = first; p + pool <= end; p += pool) {
            pool_header *h = (pool_header *)p;
            if (!initialised(h) || h->szidx == DUMMY_SIZE_IDX) {
                continue;  /* never used (not resident), or given back already */
            }
            if (h->ref.count != 0) {
                size_t tail = give_back_tail(p, pool, (size_t)page);
                given += tail;
                tails += tail != 0;
                continue;
            }
            if (madvise((void *)(p + (uintptr_t)page), pool - (size_t)page, MADV_DONTNEED) == 0) {
                h->szidx = DUMMY_SIZE_IDX;
                given += pool - (size_t)page;
                pools++;
            }
        }
    }
    return Py_BuildValue("nnn", (Py_ssize_t)pools, (Py_ssize_t)tails, (Py_ssize_t)given);
}

static PyMethodDef methods[] = {
    {"install", install, METH_NOARGS, "Track arenas from now on: their size, or 0 where pymalloc is not in use."},
    {"purge", purge, METH_NOARGS, "Give back free pages: (empty pools, pools' tails, bytes)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_pools", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__pools(void) { return PyModule_Create(&module); }
