package dev.acorn

/** What went wrong, as the C API's `AcornStatus` codes (1–9 are the runtime's error kinds). */
enum class Status(val code: Int) {
    /** The file is not an Acorn model, or is damaged. */
    FORMAT(1),
    /** A section's checksum does not match. */
    CHECKSUM(2),
    /** The file needs a newer runtime. */
    VERSION(3),
    /** The graph is inconsistent. */
    GRAPH(4),
    /** An input is missing, unknown, or of the wrong dtype or shape. */
    INPUT(5),
    /** A node failed while running. */
    NODE(6),
    /** The model needs something this build or CPU lacks. */
    UNSUPPORTED(7),
    /** A size limit was exceeded. */
    LIMIT(8),
    /** The file could not be read. */
    IO(9),
    /** A required argument was null. */
    NULL_ARGUMENT(100),
    /** The model, session or generator was closed (or never made). */
    INVALID_HANDLE(101),
    /** An argument is out of range or malformed. */
    INVALID_ARGUMENT(102),
    /** The object is running a call on another thread. */
    BUSY(103),
    /** The model has no embedded tokenizer, or this build has no text generation. */
    NO_TEXT(104),
    /** An internal error (a bug in Acorn): the call failed, the process goes on. */
    PANIC(105),
    /** A code this version of the binding does not know. */
    UNKNOWN(-1);

    companion object {
        @JvmStatic
        fun of(code: Int): Status = values().firstOrNull { it.code == code } ?: UNKNOWN
    }
}

/**
 * A call into the runtime failed. [message] is the runtime's own (for example which input has
 * the wrong shape, or which ops a model needs that this build lacks); [status] says what kind
 * of failure it is.
 */
class AcornException(val code: Int, message: String) : RuntimeException(message) {
    val status: Status get() = Status.of(code)
}
