/* Optional accelerator for jobflow_cache.hashing (see the "Accelerator" section of its docstring).
 *
 * tree(obj, depth, max_depth, fallback, hook, exact, markers[, tuples]) walks a value once and
 * returns a tree that orjson encodes to exactly the bytes of the canonical tree of ``obj``:
 *
 * - a node that is already canonical is returned as is (the same object, not a copy): exact str
 *   with a UTF-8 form, finite float, int in the signed 64-bit range, bool, None, and list or dict
 *   whose parts are all canonical;
 * - an exact tuple becomes the one-key dict {"\x00tuple": items}, where items is the tuple itself
 *   when all its parts are canonical (orjson writes a tuple as a JSON array), else a list; with
 *   ``tuples`` false (inside an object's JSON form, hashing._InForm) a tuple is walked as a list;
 * - a dict that is canonical but for its monty "@version" key (beside "@module" and "@class") is
 *   copied without it, as hashing._drop_version does;
 * - every other node (subclasses such as namedtuples, enums, numpy scalars and arrays, sets,
 *   datetimes, NaN and infinities, big ints, lone surrogates, dicts with non-str or NUL-prefixed
 *   keys, monty numpy and datetime dicts (any "@class" of "array" or "datetime"), containers
 *   nested deeper than max_depth, and str values the hook may replace) is handed to
 *   ``fallback(node, hook, depth)``, the pure-Python reference (hashing._canon), and its result
 *   takes the node's place in a copy of each enclosing container (copy on write).
 *
 * Which str values the hook may replace: none if hook is None; otherwise every str if exact is
 * None, else those that are in ``exact`` (any container) or contain one of the str in the tuple
 * ``markers``. Dict keys are never passed to the hook.
 *
 * Depth counts containers exactly as the reference does: a container at depth d >= max_depth
 * goes to the fallback (which raises), the items of a container at depth d are at depth d + 1.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

typedef struct {
    int max_depth;
    int tuples;         /* tag exact tuples (else they are lists) */
    PyObject *fallback; /* borrowed */
    PyObject *hook;     /* borrowed, may be Py_None */
    int every_str;      /* the hook may replace any str */
    PyObject *exact;    /* borrowed, NULL if unused */
    PyObject *markers;  /* borrowed tuple of str, NULL if unused */
} State;

#define MAX_WALK_DEPTH 1000

static PyObject *s_version, *s_module, *s_class, *s_array, *s_datetime, *s_tuple_tag;
static PyObject *unhashable_error; /* hashing._UnhashableError, set by configure() */

/* If the pending exception is an _UnhashableError, append the path segment of the node it came
 * from to its ``segments`` (innermost first), as the reference does while unwinding. ``index`` is
 * used when ``key`` is NULL. */
static void
note_segment(PyObject *key, Py_ssize_t index)
{
    if (unhashable_error == NULL || !PyErr_ExceptionMatches(unhashable_error)) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *segment;
    if (key == NULL) {
        segment = PyUnicode_FromFormat("[%zd]", index);
    }
    else if (PyUnicode_IsIdentifier(key) == 1) {
        segment = PyUnicode_FromFormat(".%U", key);
    }
    else {
        segment = PyUnicode_FromFormat("[%R]", key);
    }
    PyObject *segments = value == NULL ? NULL : PyObject_GetAttrString(value, "segments");
    if (segment != NULL && segments != NULL && PyList_Check(segments)) {
        (void)PyList_Append(segments, segment);
    }
    Py_XDECREF(segment);
    Py_XDECREF(segments);
    PyErr_Clear(); /* a failure here must not replace the error being reported */
    PyErr_Restore(type, value, tb);
}

static PyObject *walk(PyObject *obj, int depth, State *st);

static PyObject *
call_fallback(PyObject *obj, int depth, State *st)
{
    PyObject *d = PyLong_FromLong(depth);
    if (d == NULL) {
        return NULL;
    }
    PyObject *args[3] = {obj, st->hook, d};
    PyObject *result = PyObject_Vectorcall(st->fallback, args, 3, NULL);
    Py_DECREF(d);
    return result;
}

/* 1 if the str has a UTF-8 form (no lone surrogates), else 0. */
static int
str_has_utf8(PyObject *s)
{
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(s) < 0) {
        PyErr_Clear();
        return 0;
    }
#endif
    int kind = PyUnicode_KIND(s);
    if (kind == PyUnicode_1BYTE_KIND) {
        return 1;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    const void *data = PyUnicode_DATA(s);
    if (kind == PyUnicode_2BYTE_KIND) {
        const Py_UCS2 *p = (const Py_UCS2 *)data;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (p[i] >= 0xD800 && p[i] <= 0xDFFF) {
                return 0;
            }
        }
        return 1;
    }
    const Py_UCS4 *p = (const Py_UCS4 *)data;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] >= 0xD800 && p[i] <= 0xDFFF) {
            return 0;
        }
    }
    return 1;
}

/* 1 if the hook may replace this str value, 0 if not, -1 on error. */
static int
str_is_candidate(PyObject *s, State *st)
{
    if (st->hook == Py_None) {
        return 0;
    }
    if (st->every_str) {
        return 1;
    }
    if (st->exact != NULL) {
        int found = PySequence_Contains(st->exact, s);
        if (found != 0) {
            return found;
        }
    }
    if (st->markers != NULL) {
        Py_ssize_t n = PyTuple_GET_SIZE(st->markers);
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t at = PyUnicode_Find(s, PyTuple_GET_ITEM(st->markers, i), 0,
                                           PY_SSIZE_T_MAX, 1);
            if (at == -2) {
                return -1;
            }
            if (at >= 0) {
                return 1;
            }
        }
    }
    return 0;
}

static PyObject *
walk_seq(PyObject *obj, int depth, State *st)
{
    if (depth >= st->max_depth) {
        return call_fallback(obj, depth, st);
    }
    int is_list = PyList_CheckExact(obj);
    PyObject *out = NULL; /* a list, made at the first item that changes */
    for (Py_ssize_t i = 0; i < Py_SIZE(obj); i++) {
        PyObject *item = is_list ? PyList_GET_ITEM(obj, i) : PyTuple_GET_ITEM(obj, i);
        Py_INCREF(item);
        PyObject *canon = walk(item, depth + 1, st);
        if (canon == NULL) {
            note_segment(NULL, i);
            Py_DECREF(item);
            Py_XDECREF(out);
            return NULL;
        }
        if (out == NULL && canon != item) {
            out = PyList_New(0);
            if (out == NULL) {
                Py_DECREF(canon);
                Py_DECREF(item);
                return NULL;
            }
            /* Py_SIZE is re-read: a fallback may have changed the list (memory safety only) */
            for (Py_ssize_t j = 0; j < i && j < Py_SIZE(obj); j++) {
                PyObject *prev = is_list ? PyList_GET_ITEM(obj, j) : PyTuple_GET_ITEM(obj, j);
                if (PyList_Append(out, prev) < 0) {
                    Py_DECREF(canon);
                    Py_DECREF(item);
                    Py_DECREF(out);
                    return NULL;
                }
            }
        }
        Py_DECREF(item);
        if (out != NULL) {
            int failed = PyList_Append(out, canon);
            Py_DECREF(canon);
            if (failed) {
                Py_DECREF(out);
                return NULL;
            }
        }
        else {
            Py_DECREF(canon);
        }
    }
    if (out != NULL) {
        return out;
    }
    return Py_NewRef(obj);
}

/* 0 if the key is not kept as it is, 2 if it is and starts with "@", else 1. */
static int
key_is_plain(PyObject *key)
{
    if (!PyUnicode_CheckExact(key) || !str_has_utf8(key)) {
        return 0;
    }
    if (PyUnicode_GET_LENGTH(key) == 0) {
        return 1;
    }
    Py_UCS4 first = PyUnicode_READ_CHAR(key, 0);
    if (first == 0) {
        return 0; /* escaped by the reference */
    }
    return first == '@' ? 2 : 1;
}

static PyObject *
walk_dict(PyObject *obj, int depth, State *st)
{
    if (depth >= st->max_depth) {
        return call_fallback(obj, depth, st);
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    int at_keys = 0; /* keys starting with "@" (monty's "@class", ...) */
    while (PyDict_Next(obj, &pos, &key, &value)) {
        int plain = key_is_plain(key);
        if (plain <= 0) {
            return call_fallback(obj, depth, st);
        }
        at_keys |= plain == 2;
    }
    /* All keys are exact str from here, so lookups run no user code. */
    int drop_version = 0;
    PyObject *cls = at_keys ? PyDict_GetItemWithError(obj, s_class) : NULL;
    if (cls != NULL) {
        if (!PyUnicode_CheckExact(cls) || PyUnicode_Compare(cls, s_array) == 0 ||
            PyUnicode_Compare(cls, s_datetime) == 0) {
            return call_fallback(obj, depth, st); /* maybe a monty numpy or datetime dict */
        }
        if (PyDict_GetItemWithError(obj, s_module) != NULL &&
            PyDict_GetItemWithError(obj, s_version) != NULL) {
            drop_version = 1;
        }
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *out = NULL; /* a copy, made at the first value that changes */
    if (drop_version) {
        out = PyDict_Copy(obj);
        if (out == NULL || PyDict_DelItem(out, s_version) < 0) {
            Py_XDECREF(out);
            return NULL;
        }
    }
    pos = 0;
    while (PyDict_Next(obj, &pos, &key, &value)) {
        Py_INCREF(key);
        Py_INCREF(value);
        /* the "@version" value is canonicalized too (the hook sees it), then dropped */
        PyObject *canon = walk(value, depth + 1, st);
        int failed = canon == NULL;
        if (failed) {
            note_segment(key, 0);
        }
        if (!failed && canon != value &&
            !(drop_version && PyUnicode_Compare(key, s_version) == 0)) {
            if (out == NULL) {
                out = PyDict_Copy(obj);
            }
            failed = out == NULL || PyDict_SetItem(out, key, canon) < 0;
        }
        Py_XDECREF(canon);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed) {
            Py_XDECREF(out);
            return NULL;
        }
    }
    if (out != NULL) {
        return out;
    }
    return Py_NewRef(obj);
}

static PyObject *
walk(PyObject *obj, int depth, State *st)
{
    PyTypeObject *t = Py_TYPE(obj);
    if (t == &PyUnicode_Type) {
        if (!str_has_utf8(obj)) {
            return call_fallback(obj, depth, st);
        }
        int candidate = str_is_candidate(obj, st);
        if (candidate < 0) {
            return NULL;
        }
        if (candidate) {
            return call_fallback(obj, depth, st);
        }
        return Py_NewRef(obj);
    }
    if (t == &PyFloat_Type) {
        if (isfinite(PyFloat_AS_DOUBLE(obj))) {
            return Py_NewRef(obj);
        }
        return call_fallback(obj, depth, st);
    }
    if (t == &PyLong_Type) {
#if PY_VERSION_HEX < 0x030C0000
        if (Py_ABS(Py_SIZE(obj)) <= 2) { /* at most two 30-bit digits */
            return Py_NewRef(obj);
        }
#endif
        int overflow = 0;
        (void)PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (overflow == 0) {
            return Py_NewRef(obj); /* an exact int cannot fail any other way */
        }
        return call_fallback(obj, depth, st);
    }
    if (obj == Py_None || t == &PyBool_Type) {
        return Py_NewRef(obj);
    }
    /* C recursion is bounded by max_depth (at most MAX_WALK_DEPTH) */
    if (t == &PyDict_Type) {
        return walk_dict(obj, depth, st);
    }
    if (t == &PyList_Type || (t == &PyTuple_Type && !st->tuples)) {
        return walk_seq(obj, depth, st);
    }
    if (t == &PyTuple_Type) {
        if (depth >= st->max_depth) {
            return call_fallback(obj, depth, st); /* which raises */
        }
        PyObject *items = walk_seq(obj, depth, st);
        if (items == NULL) {
            return NULL;
        }
        PyObject *node = PyDict_New();
        if (node == NULL || PyDict_SetItem(node, s_tuple_tag, items) < 0) {
            Py_XDECREF(node);
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(items);
        return node;
    }
    return call_fallback(obj, depth, st);
}

static PyObject *
speedups_tree(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 && nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "tree(obj, depth, max_depth, fallback, hook, exact, markers[, tuples])");
        return NULL;
    }
    int tuples = 1;
    if (nargs == 8) {
        tuples = PyObject_IsTrue(args[7]);
        if (tuples < 0) {
            return NULL;
        }
    }
    long depth = PyLong_AsLong(args[1]);
    long max_depth = PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (depth < 0 || depth > MAX_WALK_DEPTH || max_depth < 0 || max_depth > MAX_WALK_DEPTH) {
        PyErr_SetString(PyExc_ValueError, "depth and max_depth must be in [0, 1000]");
        return NULL;
    }
    State st;
    st.max_depth = (int)max_depth;
    st.tuples = tuples;
    st.fallback = args[3];
    st.hook = args[4];
    st.exact = args[5] == Py_None ? NULL : args[5];
    st.markers = args[6] == Py_None ? NULL : args[6];
    st.every_str = st.hook != Py_None && st.exact == NULL && st.markers == NULL;
    if (!PyCallable_Check(st.fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return NULL;
    }
    if (st.markers != NULL) {
        if (!PyTuple_CheckExact(st.markers)) {
            PyErr_SetString(PyExc_TypeError, "markers must be a tuple of str or None");
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(st.markers); i++) {
            if (!PyUnicode_Check(PyTuple_GET_ITEM(st.markers, i))) {
                PyErr_SetString(PyExc_TypeError, "markers must be a tuple of str or None");
                return NULL;
            }
        }
    }
    return walk(args[0], (int)depth, &st);
}

static PyObject *
speedups_configure(PyObject *module, PyObject *error_type)
{
    if (!PyExceptionClass_Check(error_type)) {
        PyErr_SetString(PyExc_TypeError, "configure() takes an exception class");
        return NULL;
    }
    Py_XSETREF(unhashable_error, Py_NewRef(error_type));
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"configure", speedups_configure, METH_O,
     "configure(error_type)\n--\n\n"
     "Set the exception class whose ``segments`` list collects error paths."},
    {"tree", (PyCFunction)(void (*)(void))speedups_tree, METH_FASTCALL,
     "tree(obj, depth, max_depth, fallback, hook, exact, markers, tuples=True)\n--\n\n"
     "Return a tree that orjson encodes like the canonical tree of obj (see the C source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "_speedups", "Optional C accelerator for jobflow_cache.hashing.", -1,
    speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    s_version = PyUnicode_InternFromString("@version");
    s_module = PyUnicode_InternFromString("@module");
    s_class = PyUnicode_InternFromString("@class");
    s_array = PyUnicode_InternFromString("array");
    s_datetime = PyUnicode_InternFromString("datetime");
    s_tuple_tag = PyUnicode_FromStringAndSize("\0tuple", 6);
    if (s_version == NULL || s_module == NULL || s_class == NULL || s_array == NULL ||
        s_datetime == NULL || s_tuple_tag == NULL) {
        return NULL;
    }
    return PyModule_Create(&speedups_module);
}
