/* A stand-in for <Python.h> with only the declarations platform.h uses, so that the Windows
 * branch of the header can be compiled here by x86_64-w64-mingw32-gcc, which has no Windows
 * CPython headers. The declarations copy CPython's public API signatures. */
#ifndef LOOPFAST_WINDOWS_CHECK_PYTHON_H
#define LOOPFAST_WINDOWS_CHECK_PYTHON_H
#include <stddef.h>
#include <stdint.h>
typedef intptr_t Py_ssize_t;
typedef struct _object PyObject;
extern PyObject *PyExc_OSError;
PyObject *PyErr_SetFromErrno(PyObject *type);
PyObject *PyErr_SetExcFromWindowsErr(PyObject *type, int ierr);
#endif
