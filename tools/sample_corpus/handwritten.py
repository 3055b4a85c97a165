"""Hand-written documents for the LlamaThink sample corpus.

Everything in this file was written for this project.  The generator in
``generate.py`` mixes these documents with templated ones.
"""

ESSAYS = [
    """Why bread rises

Bread dough is a small farm.  When flour and water are mixed, the proteins in the flour join into long, stretchy strands called gluten.  Yeast, which is a tiny living fungus, eats some of the sugars in the flour and breathes out carbon dioxide.  The gas cannot escape through the stretchy gluten, so it collects in thousands of little pockets and the dough swells.

When the loaf goes into a hot oven, the gas expands once more and the water in the dough turns partly to steam.  Then the heat sets the gluten and the starch, and the bubbles are frozen in place.  That is why a slice of good bread is full of holes of every size.""",
    """The quiet work of tides

Twice a day, on most coasts, the sea creeps up the beach and then slips away again.  The main cause is the Moon.  Its gravity pulls a little harder on the side of the Earth that faces it than on the far side, and the oceans bulge in response.  As the Earth turns, each stretch of coast passes through the bulges and the water level rises and falls.

The Sun pulls on the oceans too.  When the Sun and the Moon line up, at new moon and full moon, their pulls add together and the tides are larger.  These are called spring tides, although they have nothing to do with the season.  When the two pull at right angles, the tides are smaller, and these are called neap tides.""",
    """A short history of the pencil

For a long time people wrote with brushes, reeds and quills dipped in ink.  A pencil is a much simpler tool: a thin stick of graphite mixed with clay, held inside a wooden case.  The more clay in the mix, the harder the pencil and the paler its line.  Artists often keep a whole row of pencils, from very hard to very soft, so that they can draw both fine grey lines and deep dark shadows.

A pencil line can be rubbed out, which makes it friendly to people who change their minds.  Carpenters, students, and architects have all relied on that simple kindness.""",
    """How a bicycle stays up

Riding a bicycle looks like a balancing act, and in a way it is.  When the bike begins to lean to one side, the rider turns the front wheel a little toward that side.  This steers the wheels back underneath the rider and the bike straightens up.  Most of the time we do this without thinking about it at all.

The shape of the front fork helps.  Because the wheel touches the ground slightly behind the line of the steering axis, a leaning bicycle tends to steer itself into the lean.  At a steady speed a riderless bicycle can even roll along for a surprising distance before it falls over.""",
    """Why the sky is blue

Sunlight looks white, but it is a mixture of all the colors of the rainbow.  When it passes through the air, it meets countless tiny molecules of nitrogen and oxygen.  These molecules scatter short, blue waves of light much more strongly than long, red ones.  Blue light is bounced around the whole sky, so whichever way we look, some of it reaches our eyes.

At sunrise and sunset the light has to travel through much more air to reach us.  By the time it arrives, most of the blue has been scattered away, and the reds and oranges are left.  That is why evenings can glow like embers.""",
    """The library at the end of the lane

There was once a library so small that it fitted inside an old bus shelter.  Someone had put up two wooden shelves and a sign that said: take a book, leave a book.  At first there were only a few paperbacks with curled corners.  By the end of the summer the shelves were so crowded that a second shelter down the road had to be borrowed.

Nobody ran it.  Nobody kept a list.  Yet the books kept moving, from one kitchen table to another, and now and then someone would find a note tucked between the pages: this one made me laugh on the train.""",
    """What a map leaves out

Every map is a kind of agreement about what matters.  A road map shows the roads and the towns but leaves out most of the trees.  A map for walkers shows the footpaths, the streams and the steep slopes, but it may not show the shops.  A map of the sea floor ignores almost everything on land.

Because no map can show everything, the people who make maps spend a great deal of time choosing.  A good map is not the one with the most detail.  It is the one that helps you do what you set out to do.""",
    """Keeping bees

A beekeeper moves slowly.  Quick movements can alarm the bees, and a calm hive is a gentle one.  Before opening the box, the beekeeper puffs a little cool smoke near the entrance.  The smoke makes the bees busy with their own honey stores and less interested in the visitor.

Inside, the frames hang side by side like the pages of a book.  Each one is covered with wax cells: some hold honey, some hold pollen, and some hold the white curled bodies of young bees that are still growing.  Somewhere among them is the queen, a longer bee who lays almost all the eggs in the colony.""",
    """The clock in the hall

The old clock in the hall was wound every Sunday evening.  It had a brass pendulum that swung once every second, and a loud tick that you stopped hearing after a day or two.  The clock kept time because the length of the pendulum decided how fast it swung.  If the clock ran slow, you raised the weight on the pendulum a little; if it ran fast, you lowered it.

When the family finally bought a small electric clock for the kitchen, nobody had the heart to stop the old one.  It went on ticking in the hall, a minute fast, just as it always had.""",
    """Why leaves change color

Leaves are green in summer because they are full of chlorophyll, the pigment that captures sunlight to make food for the tree.  Chlorophyll is always being broken down and rebuilt.  In autumn, as the days shorten and the nights grow cool, many trees stop making new chlorophyll.  The green fades, and yellow and orange pigments that were there all along begin to show.

Some trees also make red and purple pigments in autumn.  Bright, dry, sunny days followed by cool nights tend to give the strongest reds.  After that, a thin layer of cells forms where the leaf joins the twig, and the leaf falls.""",
    """On learning to swim

Most people who learn to swim as adults say the hardest part is trusting the water.  The body floats better than we expect, especially when the lungs are full of air and the head rests back.  A tense swimmer sinks at the legs; a relaxed one lies almost flat.

Teachers often begin with breathing.  You blow bubbles slowly into the water, turn your head, and take a calm breath.  Once the breathing is easy, the arms and legs have something to work with.  After that it is mostly practice, a little every week, until one day the far end of the pool does not seem so far.""",
    """Salt

Salt has been valued for thousands of years.  Before refrigerators, it was one of the best ways to keep meat and fish from spoiling, because it draws water out of food and makes it hard for bacteria to grow.  Towns grew up near salt springs and salty lakes, and roads were built to carry salt to places that had none.

Today salt is cheap and easy to find, and most of us eat more of it than we need.  Still, a pinch of salt can change the taste of almost anything.  It makes sweet things taste sweeter and bitter things taste less bitter.""",
    """The lighthouse keeper's log

Wind from the north-east all day.  Lit the lamp at twenty past four.  Two fishing boats came in before dark, both low in the water with a good catch.  A cargo ship passed well out to sea at about nine.  Trimmed the wick at midnight and again at three.  Fog came down before dawn, so I sounded the horn every half minute until the sun burned it away.  Mended the gate to the vegetable patch in the afternoon.  The gulls have found the new potatoes.""",
    """How sound travels

Sound is a wave of pressure.  When a drum is struck, its skin pushes the air next to it, and that air pushes the air beyond it, and so on.  The air itself does not travel far; it is the push that travels.  When the push reaches your ear, it makes your eardrum move, and your brain turns that movement into the sound of a drum.

Sound needs something to travel through.  It moves faster in water than in air, and faster still in steel.  In the empty space between the planets there is almost nothing to carry it, so space is silent.""",
    """Mending a sock

A hole in a sock does not have to be the end of it.  Slip a smooth, round object inside, such as a darning mushroom or even a lemon, so that the fabric is gently stretched.  With a blunt needle and a wool that matches the sock, make a row of stitches that run up and down across the hole, starting a little way outside the damaged area.  Then weave the thread across these stitches, over one and under the next, like a tiny basket.

The mend will be thicker than the rest of the sock, but it will be strong.  Some people choose a bright contrasting color on purpose, so that every mend becomes a small decoration.""",
    """Rain on a tin roof

The cabin had a tin roof, and the first rain of the evening arrived as a handful of separate taps, as if someone were testing it.  Then it came in earnest, a steady roar that filled the room and made it hard to talk.  We stopped trying.  Somebody put the kettle on, and somebody else found a pack of cards, and for an hour we played without saying a word, listening to the roof.""",
    """Why we have seasons

The Earth's axis is tilted.  As the planet travels around the Sun over the year, the northern half leans toward the Sun for part of the orbit and away from it for the other part.  When your half of the world leans toward the Sun, the days are long and the sunlight arrives steeply, carrying more energy to each patch of ground.  That is summer.  When it leans away, the days are short and the light comes in at a low angle.  That is winter.

Many people think the seasons happen because the Earth moves closer to and farther from the Sun.  The distance does change a little, but not enough to explain the seasons.  In fact, the Earth is closest to the Sun in early January, in the middle of the northern winter.""",
    """The market on Saturday

By seven o'clock the square was full of awnings.  The fruit seller stacked his apples into neat pyramids and polished the top ones on his sleeve.  The cheese stall smelled of cellars.  A woman with a folding table sold honey in jars of three sizes and would let you taste it from a wooden stick.  At the far end, a boy played the same four tunes on a violin all morning, and people dropped coins into his case without really listening, the way you might greet a neighbor without stopping to talk.""",
    """Magnets

A magnet has two ends, called poles.  If you bring two magnets together, opposite poles pull toward each other and matching poles push apart.  Inside a magnet, countless tiny regions are lined up so that their magnetic effects add together instead of cancelling out.

The Earth itself behaves like a huge magnet.  That is why the needle of a compass swings to point roughly north.  Sailors and travelers used compasses for centuries to find their way when clouds hid the Sun and the stars.""",
    """A note on patience

Gardeners learn patience whether they want to or not.  A seed planted in spring may not show anything for weeks, and a young fruit tree may not give a single apple for several years.  The work is mostly waiting, watering and pulling weeds, and the rewards arrive on their own schedule.  Perhaps that is why so many people find gardening calming: it is one of the few places where hurrying does not help at all.""",
    """The water cycle

The water in a puddle has been on a long journey.  Heat from the Sun makes water evaporate from seas, lakes and leaves, and it rises into the air as invisible vapor.  High up, where the air is cold, the vapor condenses into tiny droplets that gather into clouds.  When the droplets join together and grow heavy, they fall as rain, snow or hail.

Some of that water soaks into the ground and feeds springs and wells.  Some runs off into streams and rivers and back to the sea.  Then the Sun warms it again, and the journey starts over.  The same water has been going round this cycle for a very long time.""",
    """Volcanoes

Deep under our feet the rock is hot enough to melt in places.  This molten rock, called magma, is lighter than the solid rock around it, so it slowly rises.  Where it finds a way to the surface, a volcano forms.  Once magma reaches the surface, it is called lava.

Some volcanoes erupt gently, with rivers of runny lava flowing down their sides.  Others erupt violently, throwing out ash and rock, because their magma is thick and full of trapped gas.  Over many years, layer upon layer of cooled lava and ash can build a mountain.""",
    """The first snow

The first snow of the year always arrives at night, or so it seems.  You go to bed with the streetlight shining on wet black tarmac and wake to a strange brightness at the edge of the curtains.  The street is silent.  Cars are soft white shapes.  A single line of footprints crosses the road from one door to another, and you find yourself wondering who was out so early, and why.""",
    """Friction

When you push a heavy box across the floor, it resists.  That resistance is friction.  No surface is perfectly smooth; even polished metal is full of tiny bumps when you look closely enough.  As two surfaces slide past each other, the bumps catch and rub, and some of the energy of the motion turns into heat.

Friction can be a nuisance, but we could not live without it.  It lets our shoes grip the pavement, keeps a knot from slipping, and lets the brakes of a bicycle bring it to a stop.  On ice, where there is very little friction, even walking becomes difficult.""",
    """Photosynthesis in plain words

A plant makes its own food out of air, water and light.  Its leaves take in carbon dioxide from the air through tiny openings, and its roots draw water up from the soil.  Inside the leaf, green chlorophyll captures energy from sunlight and uses it to join the carbon dioxide and water into sugar.  Oxygen is left over, and the plant lets it out into the air.

The sugar gives the plant energy and becomes the building material for new stems, leaves, roots and fruit.  Almost every meal we eat can be traced back to this quiet process happening in a leaf somewhere.""",
    """Moving house

The boxes multiplied.  Every cupboard seemed to hold more than it possibly could, and every drawer contained at least one object that nobody could explain.  There were three keys that fitted no lock, a postcard from a seaside town that no one remembered visiting, and a single blue glove.  By the last evening the rooms echoed, and the children ran from one to another just to hear their voices bounce off the bare walls.""",
    """Rainbows

To see a rainbow, stand with the Sun behind you and rain in front of you.  Each falling drop acts like a tiny prism.  Light enters the drop, bends, reflects off the back, and bends again on the way out.  Because each color bends by a slightly different amount, the white sunlight is spread into bands: red on the outside, then orange, yellow, green, blue and violet on the inside.

Sometimes a second, fainter rainbow appears outside the first, with its colors in the opposite order.  The sky between the two bows often looks darker than the sky around them.""",
    """Shipping a parcel

Before the parcel left the house, it was weighed on the kitchen scales, wrapped twice in brown paper, and tied with string in the old-fashioned way.  Inside were a jar of plum jam, a scarf, and a letter of four pages.  The post office clerk pressed on the label and dropped the parcel into a grey sack, and it began a journey by van, by train and by van again, to a town three hundred miles to the north, where it would be opened at another kitchen table two days later.""",
    """How a refrigerator keeps things cold

A refrigerator does not make cold.  It moves heat.  A special fluid circulates through pipes at the back and inside the walls.  Inside the fridge, the fluid evaporates and soaks up heat from the food and the air.  A pump called the compressor then squeezes the vapor, which makes it hot, and pushes it through the coils at the back, where it gives its heat away to the room and turns back into liquid.

That is why the back of a refrigerator feels warm.  The heat from your milk and your leftovers is being carried out into the kitchen.""",
    """The stonemason

He had worked stone for forty years and still talked to it.  Before he made a cut he would run his thumb along the grain and mutter something nobody else could hear.  Apprentices learned quickly that there was no rushing him.  A block that was split in the wrong place could not be mended, he said, and a wall built in a hurry would stand for a hurry.  The walls he built have stood for a good deal longer than that.""",
]

FABLES = [
    """The tortoise and the kite

A tortoise watched a kite dancing high above the hill and felt sorry for herself.  "If only I could fly," she said, "I would see the whole valley at once."  The kite, who was tied to a string held by a small boy, heard her.  "You can walk wherever you like," said the kite.  "I can only go where the string allows."  The tortoise thought about this for a long time, which is what tortoises do best.  Then she set off slowly to climb the hill and look at the valley for herself.""",
    """The two wells

Two villages shared a valley.  The first village dug one deep well and looked after it carefully, cleaning it every spring.  The second village dug a new shallow well each year, because digging was quick, and they thought looking after a well was dull.  One dry summer every shallow well failed.  The people of the second village walked up the valley with their buckets, and the first village, though it grumbled, shared its water.  The next spring, both villages cleaned the deep well together.""",
    """The proud candle

A tall candle stood on a table beside a small oil lamp.  "Look how bright I am," said the candle.  "Nobody will notice you tonight."  The lamp said nothing.  The candle blazed for an hour and then another, growing shorter and shorter, until it guttered and went out.  The little lamp was refilled from a jug and went on burning, steady and modest, until morning.""",
    """The crow and the clever fox

A crow found a piece of cheese and flew up to a branch to eat it in peace.  A fox sat down beneath the tree.  "What a fine voice you must have," said the fox, "to go with such handsome feathers.  Won't you sing for me?"  The crow was about to open her beak, but then she remembered her cousin, who had lost a whole sandwich that way.  She put the cheese under her foot, sang a short and rather bad song, and ate the cheese afterwards.  The fox went home hungry.""",
    """The river and the rock

A rock sat in the middle of a river and refused to move.  The river did not argue.  It simply went around the rock, day after day, year after year.  Little by little the water smoothed the rock's sharp corners and carried away grains of it.  After a thousand years the rock was a pebble, rolling along the river bed, and it had to admit that the river had been patient in a way a rock could never be.""",
]

HOWTOS = [
    """How to fix a flat bicycle tire

1. Take the wheel off the bike.  If it has a quick release lever, open the lever and loosen the nut.
2. Let out any air that is left in the tube.
3. Use two tire levers to lift one side of the tire over the rim.
4. Pull out the inner tube and find the hole.  Pump a little air in and listen for a hiss, or hold the tube near your cheek to feel the leak.
5. Run your fingers carefully around the inside of the tire to find whatever caused the puncture, such as a thorn or a sliver of glass, and remove it.
6. Patch the hole or fit a new tube.
7. Push the tire back onto the rim with your thumbs, pump it up to the pressure printed on the side of the tire, and refit the wheel.""",
    """How to plant a tomato seedling

1. Choose a sunny spot that gets at least six hours of light a day.
2. Dig a hole deeper than the pot the seedling came in.
3. Remove the lowest leaves and set the plant deep in the hole, so that part of the stem is buried.  New roots will grow from the buried stem.
4. Fill the hole with soil and firm it gently around the stem.
5. Water well at the base of the plant, not over the leaves.
6. Push a stake or cane into the ground beside the plant and tie the stem loosely to it as it grows.""",
    """How to clean a paintbrush

For water-based paint, rinse the brush under warm running water while you squeeze the bristles between your fingers.  A little soap helps.  Keep going until the water runs clear.

For oil-based paint, first wipe off as much paint as you can onto old newspaper.  Then swirl the brush in a jar of the right solvent, wipe it again, and repeat with clean solvent.  Finish with warm soapy water.

In both cases, shake out the water, reshape the bristles with your fingers, and let the brush dry lying flat or hanging with the bristles down.""",
    """How to make a simple paper boat

1. Take a rectangular sheet of paper and fold it in half from top to bottom.
2. Fold the top corners down to the middle so that they meet, making a triangle with a strip of paper below it.
3. Fold the strip up on one side.  Turn the paper over and fold the other strip up.
4. Open the shape from the bottom and flatten it into a square.
5. Fold the bottom corners of the square up to the top, on both sides, to make a triangle.
6. Open the triangle from the bottom again and flatten it into a square.
7. Gently pull the top points apart, and the boat will open out.""",
    """How to brew a pot of tea

1. Fill the kettle with fresh cold water and bring it to the boil.
2. Pour a little hot water into the teapot, swirl it around, and tip it out.  This warms the pot.
3. Add one spoonful of tea leaves for each person, and one extra for the pot if you like it strong.
4. Pour on the boiling water and put the lid on.
5. Wait three to five minutes.
6. Pour through a strainer.  Add milk, lemon or nothing at all, as you prefer.""",
    """How to read a contour map

Contour lines join places that are at the same height above the sea.  Each line is usually labeled with its height, or every fifth line is drawn thicker and labeled.

Where the lines are close together, the ground is steep.  Where they are far apart, it is gentle.  A set of closed rings, one inside another, shows a hill, with the top in the middle.  Lines that form a V pointing uphill show a valley, often with a stream at the bottom.  Lines that form a V pointing downhill show a ridge.""",
    """How to sharpen a kitchen knife on a whetstone

1. Soak the stone in water for about ten minutes, unless it is the kind that should be used dry.
2. Place it on a damp cloth so it will not slide.
3. Hold the knife with the edge facing away from you, tilted at a low, steady angle.
4. Push the blade across the stone from heel to tip, as if you were shaving a thin slice off the top of the stone.
5. Do the same number of strokes on the other side.
6. Start with the coarse side of the stone and finish with the fine side.
7. Rinse and dry the knife, and test it carefully on a sheet of paper.""",
    """How to start a compost heap

Choose a corner of the garden that is partly shaded and sits on bare soil, so that worms can move in from below.  Start with a layer of twigs for air.  Then add kitchen scraps such as fruit peel, vegetable trimmings, tea leaves and coffee grounds, and mix them with dry brown material such as fallen leaves, straw or torn cardboard.

Keep the heap about as damp as a squeezed sponge.  Turn it with a fork every few weeks to let in air.  Avoid meat, fish and cooked food, which attract pests.  After six months to a year, the bottom of the heap will be dark, crumbly compost that smells like a forest floor.""",
]
