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
 *   block go the same way (give_back_tail). An arena with half its pools free or more is parked
 *   (park): its empty pools' first pages go too.
 *
 * The pool header's and arena record's layouts are CPython's (Objects/obmalloc.c, unchanged from
 * 3.10 to 3.13); the Python side (memory.py) installs this only on those versions, with pymalloc in use. A region is
 * purged only when it was allocated with the arena size given to install() and every pool header
 * in it is consistent with one arena. Everything runs with the GIL held, as pymalloc does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dlfcn.h>
#include <link.h>
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

/* pymalloc's record of an arena (Objects/obmalloc.c, unchanged from 3.10 to 3.13): its table is
 * `arenas`; those with free pools form the list `usable_arenas`, sorted by nfreepools, and
 * `nfp2lasta[n]` is the rightmost of them with n free pools. */
typedef struct arena_object {
    uintptr_t address;
    void *pool_address;
    unsigned int nfreepools;
    unsigned int ntotalpools;
    pool_header *freepools;
    struct arena_object *nextarena;
    struct arena_object *prevarena;
} arena_object;

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


/* ---- Parking the arenas a burst left nearly empty ----
 *
 * The first page of every empty pool stays after the purge: the arena's list of free pools runs
 * through the pools' headers. An arena that a burst left with a few pools in use thus keeps 4 KiB
 * for each of its (up to 63) empty pools. Parking such an arena does to it what pymalloc does when
 * an arena's last free pool is taken: the arena leaves `usable_arenas` (the list of arenas with free
 * pools), and its free pools leave its books (nfreepools 0, ntotalpools the pools in use), so that
 * nothing reads them again and all their pages go back. pymalloc goes on serving and freeing blocks
 * in the pools in use; when one of them empties, the arena rejoins the list with that pool (the
 * "nf == 1" case of insert_to_freepool), and once all of them have, nfreepools reaches ntotalpools
 * and pymalloc unmaps the arena. The arena table (`arenas`) and `nfp2lasta` are static in
 * obmalloc.c: they are found in CPython's own writable data by their contents, checked again on
 * every purge, and an arena is parked only when every count in its record agrees with its pools. */

#define LAST_OF_SIZE (POOLS_PER_ARENA + 1)
#define PARK_MIN (POOLS_PER_ARENA / 2)   /* free pools an arena must have to be parked */

typedef struct { uintptr_t start, end; } span;

static span readable[8192];
static size_t nreadable = 0;
static span data[32];                    /* CPython's writable segments */
static size_t ndata = 0;
static uintptr_t *table_slot = NULL;     /* where obmalloc keeps the table's address */
static arena_object **last_of = NULL;    /* obmalloc's nfp2lasta */

static void read_maps(void) {
    nreadable = 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    if (maps == NULL) {
        return;
    }
    char line[4096];
    while (nreadable < sizeof readable / sizeof *readable && fgets(line, sizeof line, maps) != NULL) {
        unsigned long start, end;
        char perms[5];
        if (sscanf(line, "%lx-%lx %4s", &start, &end, perms) == 3 && perms[0] == 'r' && perms[1] == 'w') {
            readable[nreadable++] = (span){start, end};
        }
    }
    fclose(maps);
}

/* Whether [p, p + n) lies in one readable and writable mapping (the maps are sorted by address). */
static int is_readable(uintptr_t p, size_t n) {
    size_t lo = 0, hi = nreadable;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (readable[mid].end <= p) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < nreadable && readable[lo].start <= p && p + n <= readable[lo].end;
}

static int writable_segments(struct dl_phdr_info *info, size_t size, void *target) {
    int mine = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t start = info->dlpi_addr + ph->p_vaddr;
        mine |= ph->p_type == PT_LOAD && (uintptr_t)target >= start && (uintptr_t)target < start + ph->p_memsz;
    }
    if (!mine) {
        return 0;
    }
    for (int i = 0; i < info->dlpi_phnum && ndata < sizeof data / sizeof *data; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_LOAD && (ph->p_flags & PF_W)) {
            uintptr_t start = (info->dlpi_addr + ph->p_vaddr + sizeof(void *) - 1) & ~(uintptr_t)(sizeof(void *) - 1);
            data[ndata++] = (span){start, info->dlpi_addr + ph->p_vaddr + ph->p_memsz};
        }
    }
    return 1;
}

/* Each tracked arena's index in the table, from its pools' headers (-1: none carved). */
static long arena_index(uintptr_t base, size_t pool) {
    uintptr_t first = (base + pool - 1) & ~(uintptr_t)(pool - 1);
    for (uintptr_t p = first; p + pool <= base + arena_size; p += pool) {
        if (initialised((const pool_header *)p)) {
            return ((const pool_header *)p)->arenaindex;
        }
    }
    return -1;
}

/* The table at `value`, if the record at each tracked arena's index names that arena. */
static arena_object *table_at(uintptr_t value, const long *index) {
    int named = 0;
    if (value == 0 || value % sizeof(void *) != 0) {
        return NULL;
    }
    for (size_t i = 0; i < narenas; i++) {
        if (index[i] < 0) {
            continue;
        }
        uintptr_t at = value + (uintptr_t)index[i] * sizeof(arena_object);
        if (at < value || !is_readable(at, sizeof(arena_object)) || ((arena_object *)at)->address != (uintptr_t)arenas[i]) {
            return NULL;
        }
        named = 1;
    }
    return named ? (arena_object *)value : NULL;
}

static arena_object *find_table(const long *index) {
    if (table_slot != NULL) {
        arena_object *table = table_at(*table_slot, index);
        if (table != NULL) {
            return table;
        }
    }
    table_slot = NULL;
    for (size_t s = 0; s < ndata; s++) {
        for (uintptr_t *slot = (uintptr_t *)data[s].start; (uintptr_t)(slot + 1) <= data[s].end; slot++) {
            if (table_at(*slot, index) != NULL) {
                table_slot = slot;
                return (arena_object *)*slot;
            }
        }
    }
    return NULL;
}

static int in_table(const arena_object *table, const arena_object *a) {
    return a >= table && ((uintptr_t)a - (uintptr_t)table) % sizeof(arena_object) == 0
        && is_readable((uintptr_t)a, sizeof(arena_object)) && a->address != 0;
}

/* What nfp2lasta must hold, from usable_arenas walked through `member` (an arena in it); 0 if the
 * list is not as pymalloc keeps it (linked both ways, sorted by free pools). */
static int expected_last_of(const arena_object *table, arena_object *member, arena_object **expect) {
    arena_object *a = member;
    size_t steps = 0;
    memset(expect, 0, LAST_OF_SIZE * sizeof *expect);
    while (a->prevarena != NULL) {
        if (!in_table(table, a->prevarena) || a->prevarena->nextarena != a || ++steps > (1u << 20)) {
            return 0;
        }
        a = a->prevarena;
    }
    unsigned int previous = 1;
    for (steps = 0; a != NULL; a = a->nextarena) {
        if (!in_table(table, a) || a->nfreepools < previous || a->nfreepools > POOLS_PER_ARENA
                || (a->nextarena != NULL && (!in_table(table, a->nextarena) || a->nextarena->prevarena != a))
                || ++steps > (1u << 20)) {
            return 0;
        }
        previous = a->nfreepools;
        expect[a->nfreepools] = a;
    }
    return 1;
}

static arena_object **find_last_of(arena_object *const *expect) {
    if (last_of != NULL && memcmp(last_of, expect, LAST_OF_SIZE * sizeof *expect) == 0) {
        return last_of;
    }
    arena_object **found = NULL;
    for (size_t s = 0; s < ndata; s++) {
        for (uintptr_t p = data[s].start; p + LAST_OF_SIZE * sizeof *expect <= data[s].end; p += sizeof(void *)) {
            if (memcmp((const void *)p, expect, LAST_OF_SIZE * sizeof *expect) == 0) {
                if (found != NULL) {
                    return last_of = NULL;  /* two candidates: neither is trusted */
                }
                found = (arena_object **)p;
            }
        }
    }
    return last_of = found;
}

/* Park the arena of record `a` (pools from `first` to `end`) if it has PARK_MIN free pools, is not
 * the head of usable_arenas and its record agrees with its pools: the bytes given back. Without
 * nfp2lasta (`last`), only an arena that is not the rightmost with its count of free pools. */
static size_t park(arena_object *a, arena_object **last, uintptr_t first, uintptr_t end, size_t pool, size_t page) {
    if (a->nfreepools < PARK_MIN || a->prevarena == NULL) {
        return 0;
    }
    unsigned int used = 0, empty = 0, uncarved = 0, listed = 0;
    for (uintptr_t p = first; p + pool <= end; p += pool) {
        const pool_header *h = (const pool_header *)p;
        if (p >= (uintptr_t)a->pool_address) {
            uncarved++;
        } else if (!initialised(h)) {
            return 0;  /* carved pools are initialised */
        } else if (h->ref.count == 0) {
            empty++;
        } else {
            used++;
        }
    }
    for (const pool_header *f = a->freepools; f != NULL; f = f->nextpool) {
        if ((uintptr_t)f < first || (uintptr_t)f + pool > end || ((uintptr_t)f - first) % pool != 0
                || f->ref.count != 0 || ++listed > empty) {
            return 0;
        }
    }
    if (used == 0 || listed != empty || empty + uncarved != a->nfreepools || used + empty + uncarved != a->ntotalpools) {
        return 0;
    }
    unsigned int nf = a->nfreepools;
    arena_object *prev = a->prevarena, *next = a->nextarena;
    if (last != NULL) {
        if (last[nf] == a) {
            last[nf] = prev->nfreepools == nf ? prev : NULL;
        }
    } else if (next == NULL || next->nfreepools != nf) {
        return 0;  /* the rightmost with nf free pools: nfp2lasta names it */
    }
    prev->nextarena = next;
    if (next != NULL) {
        next->prevarena = prev;
    }
    a->nextarena = a->prevarena = NULL;
    size_t given = 0;
    for (pool_header *f = a->freepools, *after; f != NULL; f = after) {
        after = f->nextpool;
        size_t resident = f->szidx == DUMMY_SIZE_IDX ? (size_t)page : pool;
        if (madvise(f, pool, MADV_DONTNEED) == 0) {
            given += resident;
        }
    }
    a->freepools = NULL;
    a->nfreepools = 0;
    /* Never 1: when a pool of an arena out of the list empties, insert_to_freepool tests "all pools
     * free" (nf == ntotalpools) before it links the arena back, with the arena's links left over from
     * when it last left the list. With one pool in use, its total stays 2: such an arena goes on
     * lending that pool but is not unmapped. */
    a->ntotalpools = used > 1 ? used : 2;
    return given;
}

/* obmalloc's table and nfp2lasta, found or checked again: the table (NULL when parking is off) and
 * nfp2lasta (NULL when not found: then only arenas that it does not name are parked). */
static arena_object *obmalloc_state(const long *index, size_t pool, arena_object ***last) {
    *last = NULL;
    read_maps();
    if (ndata == 0) {
        dl_iterate_phdr(writable_segments, (void *)PyObject_Malloc);
    }
    arena_object *table = find_table(index);
    if (table == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < narenas; i++) {
        if (index[i] >= 0 && table[index[i]].nfreepools > 0) {
            arena_object *expect[LAST_OF_SIZE];
            if (!expected_last_of(table, &table[index[i]], expect)) {
                return NULL;  /* usable_arenas is not as pymalloc keeps it: touch nothing */
            }
            *last = find_last_of(expect);
            return table;
        }
    }
    return table;  /* no tracked arena has a free pool: nothing to park */
}

static PyObject *purge(PyObject *self, PyObject *noargs) {
    long page = sysconf(_SC_PAGESIZE);
    size_t pool = arena_size / POOLS_PER_ARENA, given = 0, pools = 0, tails = 0, parked = 0;
    if (arena_size == 0 || page <= 0 || pool <= (size_t)page || narenas == 0) {
        return Py_BuildValue("nnnn", (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0);
    }
    long *index = malloc(narenas * sizeof *index);
    arena_object *table = NULL, **last = NULL;
    if (index != NULL) {
        for (size_t i = 0; i < narenas; i++) {
            index[i] = arena_index((uintptr_t)arenas[i], pool);
        }
        table = obmalloc_state(index, pool, &last);
    }
    for (size_t i = 0; i < narenas; i++) {
        uintptr_t base = (uintptr_t)arenas[i], end = base + arena_size;
        uintptr_t first = (base + pool - 1) & ~(uintptr_t)(pool - 1);
        if (!is_arena(first, end, pool)) {
            continue;
        }
        if (table != NULL && index[i] >= 0) {
            size_t freed = park(&table[index[i]], last, first, end, pool, (size_t)page);
            given += freed;
            parked += freed != 0;
        }
        for (uintptr_t p = first; p + pool <= end; p += pool) {
            pool_header *h = (pool_header *)p;
            if (!initialised(h) || h->szidx == DUMMY_SIZE_IDX) {
                continue;  /* never used (not resident), given back already, or parked */
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
    free(index);
    return Py_BuildValue("nnnn", (Py_ssize_t)pools, (Py_ssize_t)tails, (Py_ssize_t)parked, (Py_ssize_t)given);
}

static PyObject *located(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("OO", table_slot != NULL ? Py_True : Py_False, last_of != NULL ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"install", install, METH_NOARGS, "Track arenas from now on: their size, or 0 where pymalloc is not in use."},
    {"located", located, METH_NOARGS, "Whether the last purge found obmalloc's arena table and nfp2lasta."},
    {"purge", purge, METH_NOARGS, "Give back free pages: (empty pools, pools' tails, arenas parked, bytes)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_pools", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__pools(void) { return PyModule_Create(&module); }
