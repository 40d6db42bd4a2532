package dev.acorn

/** One utterance's class: its [label], the label's probability, and which layer's head answered. */
data class Prediction(
    val label: String,
    val score: Float,
    /** The 1-based encoder layer whose head answered ([layers] when the whole encoder ran). */
    val exitLayer: Int,
    val layers: Int
)

/**
 * An intent classifier: a model `acorn convert --train` wrote (encoder, head, early exits and
 * tokenizer in one file), from [Model.newClassifier]. One call at a time.
 *
 * ```
 * Model.open(path).use { m -> m.newClassifier().use { c -> c.classify("set a timer") } }
 * ```
 */
class Classifier internal constructor(handle: Long) : AutoCloseable {
    @Volatile private var handle: Long = handle

    /** The labels, in the head's order. */
    val labels: List<String> by lazy { Native.classifierLabels(live()).toList() }

    /** Whether runs may stop at an exit head (default true); false runs the whole encoder. */
    var useExits: Boolean = true
        @Synchronized set(on) {
            Native.classifierSetExits(live(), on)
            field = on
        }

    /** Replaces the exits' confidence thresholds (one per exit, each in (0, 1]). */
    @Synchronized
    fun setThresholds(thresholds: FloatArray) = Native.classifierSetThresholds(live(), thresholds)

    /** Classifies utterances as one batch. */
    @Synchronized
    fun classify(vararg texts: String): List<Prediction> {
        val flat = Native.classify(live(), arrayOf(*texts))
        return List(texts.size) { i ->
            Prediction(labels[flat[4 * i].toInt()], flat[4 * i + 1], flat[4 * i + 2].toInt(), flat[4 * i + 3].toInt())
        }
    }

    private fun live(): Long = handle.also { check(it != 0L) { "the classifier is closed" } }

    /** Frees the classifier (idempotent). */
    @Synchronized
    override fun close() {
        val h = handle
        handle = 0
        if (h != 0L) Native.classifierFree(h)
    }
}

/** Sentence embeddings of text ([Model.newEmbedder]): what [HeadTrainer] learns from. */
class Embedder internal constructor(handle: Long) : AutoCloseable {
    @Volatile private var handle: Long = handle

    /** The embedding of [text]. */
    @Synchronized
    fun embed(text: String): FloatArray = Native.embed(live(), text)

    private fun live(): Long = handle.also { check(it != 0L) { "the embedder is closed" } }

    @Synchronized
    override fun close() {
        val h = handle
        handle = 0
        if (h != 0L) Native.embedderFree(h)
    }
}

/** How [HeadTrainer.fit] fits a head. */
enum class HeadKind(internal val code: Int) {
    /** Nearest prototype: instant, works from one example per label. */
    PROTOTYPE(1),
    /** Softmax regression: a few milliseconds, better with several examples per label. */
    SOFTMAX(2)
}

/** Labelled embeddings collected on the device: teaches an encoder new intents, no converter. */
class HeadTrainer : AutoCloseable {
    @Volatile private var handle: Long = Native.trainerNew()

    /** Adds one example. */
    @Synchronized
    fun add(label: String, embedding: FloatArray) = Native.trainerAdd(live(), label, embedding)

    /** A head fitted on every example so far. */
    @Synchronized
    @JvmOverloads
    fun fit(kind: HeadKind = HeadKind.PROTOTYPE): Head = Head(Native.trainerFit(live(), kind.code))

    private fun live(): Long = handle.also { check(it != 0L) { "the trainer is closed" } }

    @Synchronized
    override fun close() {
        val h = handle
        handle = 0
        if (h != 0L) Native.trainerFree(h)
    }
}

/** A head's answer: [label] null when [score] is below the unknown threshold. */
data class HeadAnswer(val label: String?, val score: Float)

/** A classification head over an encoder's embeddings ([HeadTrainer.fit], [Head.load]). */
class Head internal constructor(handle: Long) : AutoCloseable {
    @Volatile private var handle: Long = handle

    /** The labels, in order. */
    val labels: List<String> by lazy { Native.headLabels(live()).toList() }

    /** The label of [embedding], or null below [unknownThreshold] (in (0, 1]). */
    @JvmOverloads
    fun predict(embedding: FloatArray, unknownThreshold: Float = 1e-9f): HeadAnswer {
        val r = Native.headPredict(live(), embedding, unknownThreshold)
        val i = r[0].toInt()
        return HeadAnswer(if (i < 0) null else labels[i], r[1])
    }

    /** Saves the head for [model]'s encoder ([load] refuses it for any other encoder). */
    fun save(path: String, model: Model) = Native.headSave(live(), model.live(), path)

    private fun live(): Long = handle.also { check(it != 0L) { "the head is closed" } }

    @Synchronized
    override fun close() {
        val h = handle
        handle = 0
        if (h != 0L) Native.headFree(h)
    }

    companion object {
        /** Loads a head saved for [model]'s encoder. */
        @JvmStatic
        fun load(path: String, model: Model): Head = Head(Native.headLoad(model.live(), path))
    }
}
