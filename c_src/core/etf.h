/* etf.h: private to c_src (the core and the C-node).  The tags of the
 * external term format (erts/doc: External Term Format), for the code
 * that walks ETF bytes itself, with bounds, instead of trusting ei. */
#ifndef MOAT_ETF_H
#define MOAT_ETF_H

enum {
    ETF_VERSION = 131,
    TAG_NEW_FLOAT = 70,
    TAG_BIT_BINARY = 77,
    TAG_NEW_PID = 88,
    TAG_NEW_PORT = 89,
    TAG_NEWER_REFERENCE = 90,
    TAG_SMALL_INTEGER = 97,
    TAG_INTEGER = 98,
    TAG_FLOAT = 99,
    TAG_ATOM = 100,
    TAG_REFERENCE = 101,
    TAG_PORT = 102,
    TAG_PID = 103,
    TAG_SMALL_TUPLE = 104,
    TAG_LARGE_TUPLE = 105,
    TAG_NIL = 106,
    TAG_STRING = 107,
    TAG_LIST = 108,
    TAG_BINARY = 109,
    TAG_SMALL_BIG = 110,
    TAG_LARGE_BIG = 111,
    TAG_NEW_FUN = 112,
    TAG_EXPORT = 113,
    TAG_NEW_REFERENCE = 114,
    TAG_SMALL_ATOM = 115,
    TAG_MAP = 116,
    TAG_ATOM_UTF8 = 118,
    TAG_SMALL_ATOM_UTF8 = 119,
    TAG_V4_PORT = 120
};

#endif
